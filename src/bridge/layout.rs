//! Layouts: where each participant's picture goes on the output canvas. Pure geometry.
//!
//! Tiles follow the room's co-host order with the host first; in `side_by_side` the first
//! entry is this room's own host (left) and the second the PK partner (right).

// The layout names are protocol vocabulary (signaling and REST use them), so they live with
// the protocol types; the geometry is here.
pub use crate::signaling::protocol::{Fit, Layout};

/// A rectangle in canvas pixels. Coordinates and sizes are even so YUV 4:2:0 planes align.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

fn even(v: u32) -> u32 {
    v & !1
}

impl Rect {
    pub fn new(x: u32, y: u32, w: u32, h: u32) -> Self {
        Self {
            x: even(x),
            y: even(y),
            w: even(w),
            h: even(h),
        }
    }

    pub fn center(&self) -> (u32, u32) {
        (self.x + self.w / 2, self.y + self.h / 2)
    }
}

pub const MAX_GRID: usize = 9;

/// Tile rectangles for `n` participants on a `w`x`h` canvas, in participant order. Extra
/// participants beyond what the layout shows get no tile.
pub fn tiles(layout: Layout, n: usize, w: u32, h: u32) -> Vec<Rect> {
    if n == 0 {
        return vec![];
    }
    match layout {
        Layout::Solo => vec![Rect::new(0, 0, w, h)],
        Layout::Pip => {
            let mut out = vec![Rect::new(0, 0, w, h)];
            // Small tiles: a quarter of the canvas width, the canvas aspect, stacked upwards
            // from the bottom-right corner with a margin; as many as fit.
            let margin = (w.min(h) / 40).max(2);
            let (tw, th) = if w >= h {
                (w / 4, h / 4)
            } else {
                (w / 3, h / 5)
            };
            let mut y = h.saturating_sub(margin + th);
            for _ in 1..n {
                if y < margin {
                    break;
                }
                out.push(Rect::new(w - margin - tw, y, tw, th));
                y = y.saturating_sub(th + margin);
            }
            out
        }
        Layout::SideBySide => {
            if w >= h {
                // Landscape: two halves.
                let half = w / 2;
                let mut out = vec![Rect::new(0, 0, half, h)];
                if n > 1 {
                    out.push(Rect::new(half, 0, w - half, h));
                }
                out
            } else {
                // Portrait canvas: the two pictures side by side in the middle band, the way
                // mobile PK screens show them.
                let half = w / 2;
                let band = (half * 4 / 3).min(h);
                let y = (h - band) / 2;
                let mut out = vec![Rect::new(0, y, half, band)];
                if n > 1 {
                    out.push(Rect::new(half, y, w - half, band));
                }
                out
            }
        }
        Layout::Grid => {
            let n = n.min(MAX_GRID);
            let cols = (1..=3).find(|c| c * c >= n).unwrap_or(3) as u32;
            let rows = (n as u32).div_ceil(cols);
            let (tw, th) = (w / cols, h / rows);
            (0..n as u32)
                .map(|i| Rect::new((i % cols) * tw, (i / cols) * th, tw, th))
                .collect()
        }
    }
}

/// For a `sw`x`sh` source shown in `tile`: the source region to take (crop) and the canvas
/// region to draw it in (letterbox). Both even-aligned.
pub fn fit(fit: Fit, sw: u32, sh: u32, tile: Rect) -> (Rect, Rect) {
    if sw == 0 || sh == 0 || tile.w == 0 || tile.h == 0 {
        return (Rect::new(0, 0, sw, sh), tile);
    }
    // Compare aspect ratios without floats: sw/sh vs tile.w/tile.h.
    let src_wider = u64::from(sw) * u64::from(tile.h) > u64::from(tile.w) * u64::from(sh);
    match fit {
        Fit::Crop => {
            let src = if src_wider {
                let cw = (u64::from(sh) * u64::from(tile.w) / u64::from(tile.h)) as u32;
                Rect::new((sw - cw) / 2, 0, cw, sh)
            } else {
                let ch = (u64::from(sw) * u64::from(tile.h) / u64::from(tile.w)) as u32;
                Rect::new(0, (sh - ch) / 2, sw, ch)
            };
            (src, tile)
        }
        Fit::Letterbox => {
            let dst = if src_wider {
                let dh = (u64::from(tile.w) * u64::from(sh) / u64::from(sw)) as u32;
                Rect::new(tile.x, tile.y + (tile.h - dh) / 2, tile.w, dh)
            } else {
                let dw = (u64::from(tile.h) * u64::from(sw) / u64::from(sh)) as u32;
                Rect::new(tile.x + (tile.w - dw) / 2, tile.y, dw, tile.h)
            };
            (Rect::new(0, 0, sw, sh), dst)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inside(r: Rect, w: u32, h: u32) -> bool {
        r.x + r.w <= w && r.y + r.h <= h && r.w > 0 && r.h > 0
    }

    #[test]
    fn every_layout_stays_on_canvas_and_is_even() {
        for (w, h) in [(1280, 720), (720, 1280), (640, 360)] {
            for layout in [Layout::Solo, Layout::Pip, Layout::SideBySide, Layout::Grid] {
                for n in 1..=9 {
                    for r in tiles(layout, n, w, h) {
                        assert!(inside(r, w, h), "{layout:?} {n} {w}x{h}: {r:?}");
                        assert!(r.x % 2 == 0 && r.y % 2 == 0 && r.w % 2 == 0 && r.h % 2 == 0);
                    }
                }
            }
        }
    }

    #[test]
    fn pip_puts_cohosts_bottom_right_and_side_by_side_host_left() {
        let t = tiles(Layout::Pip, 3, 1280, 720);
        assert_eq!(t[0], Rect::new(0, 0, 1280, 720));
        assert!(
            t[1].x > 640 && t[1].y > 360,
            "first co-host bottom right: {:?}",
            t[1]
        );
        assert!(t[2].y < t[1].y && t[2].x == t[1].x, "stacked upwards");
        let s = tiles(Layout::SideBySide, 2, 1280, 720);
        assert!(s[0].center().0 < 640 && s[1].center().0 > 640);
        let g = tiles(Layout::Grid, 4, 1280, 720);
        assert_eq!(g.len(), 4);
        assert_eq!(g[3], Rect::new(640, 360, 640, 360));
        assert_eq!(tiles(Layout::Grid, 12, 1280, 720).len(), 9);
    }

    #[test]
    fn crop_and_letterbox_preserve_aspect() {
        let tile = Rect::new(0, 0, 640, 720);
        // A 16:9 source into a tall tile: crop the sides, or bars top and bottom.
        let (src, dst) = fit(Fit::Crop, 1280, 720, tile);
        assert_eq!(dst, tile);
        assert_eq!((src.w, src.h), (640, 720));
        assert_eq!(src.x, 320);
        let (src, dst) = fit(Fit::Letterbox, 1280, 720, tile);
        assert_eq!(src, Rect::new(0, 0, 1280, 720));
        assert_eq!((dst.w, dst.h), (640, 360));
        assert_eq!(dst.y, 180);
    }
}
