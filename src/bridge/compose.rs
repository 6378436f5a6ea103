//! The video compositor's pixel work: an I420 canvas, and drawing a decoded picture scaled
//! into a tile (bilinear on luma, nearest on chroma: chroma is subsampled and a tile is small
//! next to the canvas, so the difference does not show while the cost halves).

use super::layout::{Fit, Rect, fit};

/// A planar YUV 4:2:0 picture with tightly packed planes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct I420 {
    pub width: u32,
    pub height: u32,
    pub y: Vec<u8>,
    pub u: Vec<u8>,
    pub v: Vec<u8>,
}

/// A borrowed picture with strides (what decoders hand out).
#[derive(Debug, Clone, Copy)]
pub struct I420Ref<'a> {
    pub width: u32,
    pub height: u32,
    pub y: &'a [u8],
    pub u: &'a [u8],
    pub v: &'a [u8],
    pub y_stride: usize,
    pub uv_stride: usize,
}

/// A solid colour in YUV (BT.601 limited range).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Yuv(pub u8, pub u8, pub u8);

impl Yuv {
    pub const BLACK: Yuv = Yuv(16, 128, 128);
    /// The placeholder tile of a participant without video: dark grey.
    pub const PLACEHOLDER: Yuv = Yuv(48, 128, 128);

    /// From 8-bit RGB (BT.601, limited range).
    pub fn from_rgb(r: u8, g: u8, b: u8) -> Yuv {
        let (r, g, b) = (i32::from(r), i32::from(g), i32::from(b));
        let y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16;
        let u = ((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128;
        let v = ((112 * r - 94 * g - 18 * b + 128) >> 8) + 128;
        Yuv(
            y.clamp(0, 255) as u8,
            u.clamp(0, 255) as u8,
            v.clamp(0, 255) as u8,
        )
    }
}

impl I420 {
    /// A canvas filled with `c`. Width and height must be even.
    pub fn new(width: u32, height: u32, c: Yuv) -> Self {
        let (w, h) = (width as usize, height as usize);
        Self {
            width,
            height,
            y: vec![c.0; w * h],
            u: vec![c.1; (w / 2) * (h / 2)],
            v: vec![c.2; (w / 2) * (h / 2)],
        }
    }

    /// A tightly packed copy of a decoder's picture (whose planes have strides and are reused
    /// by the next decode), cut to even dimensions for 4:2:0.
    pub fn from_yuv(pic: &impl openh264::formats::YUVSource) -> Self {
        let (w, h) = pic.dimensions();
        let (ys, us, vs) = pic.strides();
        let (w, h) = (w & !1, h & !1);
        let (w2, h2) = (w / 2, h / 2);
        // Rows appended into reserved planes: no fill pass before the copy.
        let plane = |src: &[u8], stride: usize, w: usize, h: usize| {
            let mut p = Vec::with_capacity(w * h);
            for row in 0..h {
                p.extend_from_slice(&src[row * stride..row * stride + w]);
            }
            p
        };
        Self {
            width: w as u32,
            height: h as u32,
            y: plane(pic.y(), ys, w, h),
            u: plane(pic.u(), us, w2, h2),
            v: plane(pic.v(), vs, w2, h2),
        }
    }

    pub fn view(&self) -> I420Ref<'_> {
        I420Ref {
            width: self.width,
            height: self.height,
            y: &self.y,
            u: &self.u,
            v: &self.v,
            y_stride: self.width as usize,
            uv_stride: self.width as usize / 2,
        }
    }

    /// Fill a rectangle (clipped to the canvas).
    pub fn fill(&mut self, r: Rect, c: Yuv) {
        let (cw, ch) = (self.width, self.height);
        let x1 = (r.x + r.w).min(cw);
        let y1 = (r.y + r.h).min(ch);
        for y in r.y.min(ch)..y1 {
            let row = y as usize * cw as usize;
            self.y[row + r.x.min(cw) as usize..row + x1 as usize].fill(c.0);
        }
        let (cw2, x0, x1) = (cw as usize / 2, r.x.min(cw) as usize / 2, x1 as usize / 2);
        for y in (r.y.min(ch) / 2)..(y1 / 2) {
            let row = y as usize * cw2;
            self.u[row + x0..row + x1].fill(c.1);
            self.v[row + x0..row + x1].fill(c.2);
        }
    }

    /// Draw `src` into `tile`, fitted as `mode` says (the tile is filled with black first when
    /// letterboxing).
    pub fn draw(&mut self, src: &I420Ref<'_>, tile: Rect, mode: Fit) {
        if src.width < 2 || src.height < 2 {
            self.fill(tile, Yuv::PLACEHOLDER);
            return;
        }
        let (s, d) = fit(mode, src.width, src.height, tile);
        if mode == Fit::Letterbox {
            self.fill(tile, Yuv::BLACK);
        }
        let d = Rect {
            w: d.w.min(self.width.saturating_sub(d.x)),
            h: d.h.min(self.height.saturating_sub(d.y)),
            ..d
        };
        if d.w == 0 || d.h == 0 || s.w == 0 || s.h == 0 {
            return;
        }
        scale_plane_bilinear(src.y, src.y_stride, s, &mut self.y, self.width as usize, d);
        let (s2, d2) = (half(s), half(d));
        let cw2 = self.width as usize / 2;
        scale_plane_nearest(src.u, src.uv_stride, s2, &mut self.u, cw2, d2);
        scale_plane_nearest(src.v, src.uv_stride, s2, &mut self.v, cw2, d2);
    }

    /// Average luma/chroma over a rectangle: what tests read back after decoding.
    pub fn mean(&self, r: Rect) -> Yuv {
        mean_of(&self.view(), r)
    }
}

fn half(r: Rect) -> Rect {
    Rect {
        x: r.x / 2,
        y: r.y / 2,
        w: (r.w / 2).max(1),
        h: (r.h / 2).max(1),
    }
}

/// Average colour of a rectangle of any picture.
pub fn mean_of(p: &I420Ref<'_>, r: Rect) -> Yuv {
    let avg = |plane: &[u8], stride: usize, r: Rect| -> u8 {
        let mut sum = 0u64;
        let mut n = 0u64;
        for y in r.y..r.y + r.h {
            for x in r.x..r.x + r.w {
                if let Some(v) = plane.get(y as usize * stride + x as usize) {
                    sum += u64::from(*v);
                    n += 1;
                }
            }
        }
        sum.checked_div(n).unwrap_or(0) as u8
    };
    Yuv(
        avg(p.y, p.y_stride, r),
        avg(p.u, p.uv_stride, half(r)),
        avg(p.v, p.uv_stride, half(r)),
    )
}

/// Rows `s.y..s.y+s.h` of a plane, each cut to columns `s.x..s.x+s.w`; `None` if the plane is
/// too small for the rectangle (a malformed picture), so the hot loops below index plain slices.
fn rows(src: &[u8], ss: usize, s: Rect) -> Option<Vec<&[u8]>> {
    (s.y..s.y + s.h)
        .map(|y| {
            let start = y as usize * ss + s.x as usize;
            src.get(start..start + s.w as usize)
        })
        .collect()
}

fn dst_row(dst: &mut [u8], ds: usize, d: Rect, dy: u32) -> Option<&mut [u8]> {
    let start = (d.y + dy) as usize * ds + d.x as usize;
    dst.get_mut(start..start + d.w as usize)
}

fn scale_plane_nearest(src: &[u8], ss: usize, s: Rect, dst: &mut [u8], ds: usize, d: Rect) {
    let Some(src_rows) = rows(src, ss, s) else {
        return;
    };
    let xs: Vec<usize> = (0..d.w).map(|dx| (dx * s.w / d.w) as usize).collect();
    for dy in 0..d.h {
        let srow = src_rows[(dy * s.h / d.h) as usize];
        let Some(out) = dst_row(dst, ds, d, dy) else {
            return;
        };
        if s.w == d.w {
            out.copy_from_slice(srow);
        } else {
            for (o, &x) in out.iter_mut().zip(&xs) {
                *o = srow[x];
            }
        }
    }
}

fn scale_plane_bilinear(src: &[u8], ss: usize, s: Rect, dst: &mut [u8], ds: usize, d: Rect) {
    let Some(src_rows) = rows(src, ss, s) else {
        return;
    };
    // Same size: a copy (the host's full-frame tile when it matches the output).
    if s.w == d.w && s.h == d.h {
        for (dy, srow) in src_rows.iter().enumerate() {
            if let Some(out) = dst_row(dst, ds, d, dy as u32) {
                out.copy_from_slice(srow);
            }
        }
        return;
    }
    // 16.16 fixed point source coordinate of each destination pixel centre, reduced to the
    // left/top source pixel and an 8-bit weight; the column table is computed once per draw.
    let coord = |i: u32, sn: u32, dn: u32| -> (usize, u32) {
        let step = (u64::from(sn) << 16) / u64::from(dn);
        let f = (u64::from(i) * step + step / 2).saturating_sub(1 << 15);
        let i0 = (f >> 16).min(u64::from(sn - 1)) as usize;
        (i0, ((f & 0xffff) >> 8) as u32)
    };
    let cols: Vec<(usize, usize, u32)> = (0..d.w)
        .map(|dx| {
            let (x0, wx) = coord(dx, s.w, d.w);
            (x0, (x0 + 1).min(s.w as usize - 1), wx)
        })
        .collect();
    for dy in 0..d.h {
        let (y0, wy) = coord(dy, s.h, d.h);
        let (r0, r1) = (src_rows[y0], src_rows[(y0 + 1).min(s.h as usize - 1)]);
        let Some(out) = dst_row(dst, ds, d, dy) else {
            return;
        };
        for (o, &(x0, x1, wx)) in out.iter_mut().zip(&cols) {
            let top = u32::from(r0[x0]) * (256 - wx) + u32::from(r0[x1]) * wx;
            let bot = u32::from(r1[x0]) * (256 - wx) + u32::from(r1[x1]) * wx;
            *o = ((top * (256 - wy) + bot * wy + (1 << 15)) >> 16).min(255) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::layout::{Layout, tiles};

    fn close(a: Yuv, b: Yuv) -> bool {
        (i32::from(a.0) - i32::from(b.0)).abs() <= 2
            && (i32::from(a.1) - i32::from(b.1)).abs() <= 2
            && (i32::from(a.2) - i32::from(b.2)).abs() <= 2
    }

    #[test]
    fn pip_composite_puts_colours_where_the_layout_says() {
        let red = Yuv::from_rgb(220, 30, 30);
        let blue = Yuv::from_rgb(30, 30, 220);
        let host = I420::new(640, 360, red);
        let guest = I420::new(320, 480, blue);
        let mut canvas = I420::new(1280, 720, Yuv::BLACK);
        let t = tiles(Layout::Pip, 2, 1280, 720);
        canvas.draw(&host.view(), t[0], Fit::Crop);
        canvas.draw(&guest.view(), t[1], Fit::Crop);
        assert!(close(canvas.mean(Rect::new(100, 100, 200, 200)), red));
        let inner = Rect::new(t[1].x + 8, t[1].y + 8, t[1].w - 16, t[1].h - 16);
        assert!(close(canvas.mean(inner), blue), "{:?}", canvas.mean(inner));
    }

    #[test]
    fn letterbox_leaves_black_bars_and_odd_inputs_do_not_panic() {
        let green = Yuv::from_rgb(30, 200, 30);
        let wide = I420::new(640, 180, green);
        let mut canvas = I420::new(640, 640, Yuv::PLACEHOLDER);
        let tile = Rect::new(0, 0, 640, 640);
        canvas.draw(&wide.view(), tile, Fit::Letterbox);
        assert!(close(canvas.mean(Rect::new(0, 0, 640, 100)), Yuv::BLACK));
        assert!(close(canvas.mean(Rect::new(0, 300, 640, 40)), green));
        // Tiny and odd-sized pictures, tiles past the edge.
        let tiny = I420::new(2, 2, green);
        canvas.draw(&tiny.view(), Rect::new(600, 600, 100, 100), Fit::Crop);
        canvas.draw(&tiny.view(), Rect::new(0, 0, 0, 0), Fit::Letterbox);
    }

    #[test]
    fn bilinear_gradient_stays_monotonic() {
        let mut src = I420::new(64, 4, Yuv::BLACK);
        for y in 0..4 {
            for x in 0..64 {
                src.y[y * 64 + x] = (x * 4) as u8;
            }
        }
        let mut dst = I420::new(128, 4, Yuv::BLACK);
        dst.draw(&src.view(), Rect::new(0, 0, 128, 4), Fit::Crop);
        let row = &dst.y[..128];
        assert!(row.windows(2).all(|w| w[1] >= w[0]), "{row:?}");
    }
}
