//! The "host is away" slate: what viewers see in the host's place while the host's grace period
//! runs (a phone that dropped, an encoder that reconnects). Not black (viewers would think the
//! stream died) and not the host's last picture frozen (they would think the player hung): a
//! dark card with a caption and a bar that shrinks as the grace period runs out, so the picture
//! visibly moves. Drawn with a built-in 5x7 pixel font (no font files to ship).

use super::compose::{I420, Yuv};
use super::layout::Rect;

/// The caption (upper case: the font has capitals, digits and a little punctuation).
pub const CAPTION: &str = "THE HOST IS AWAY";
const SUBCAPTION: &str = "BACK SOON";

/// The card, the text and the countdown bar (BT.601 limited range).
const BACKGROUND: Yuv = Yuv(38, 140, 124);
const TEXT: Yuv = Yuv(235, 128, 128);
const BAR: Yuv = Yuv(97, 120, 200);

/// A 5x7 glyph: seven rows, the five low bits of each, leftmost pixel in bit 4.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1E],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        '!' => [0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x04],
        '?' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        '\'' => [0x04, 0x04, 0x08, 0x00, 0x00, 0x00, 0x00],
        _ => [0; 7],
    }
}

/// Draw `text` centred on row `top` with `scale` canvas pixels per font pixel (even, so the
/// chroma planes line up).
fn text(canvas: &mut I420, text: &str, top: u32, scale: u32) {
    let cells = text.chars().count() as u32;
    // Six columns per character: five of glyph, one of space (none after the last).
    let width = (cells * 6).saturating_sub(1) * scale;
    let left = canvas.width.saturating_sub(width) / 2;
    for (i, c) in text.chars().enumerate() {
        let x0 = left + i as u32 * 6 * scale;
        for (row, bits) in glyph(c).iter().enumerate() {
            for col in 0..5u32 {
                if bits & (0x10 >> col) != 0 {
                    canvas.fill(
                        Rect::new(x0 + col * scale, top + row as u32 * scale, scale, scale),
                        TEXT,
                    );
                }
            }
        }
    }
}

/// The slate at `width` x `height`, with `left` (0..=1) of the grace period remaining.
pub fn render(width: u32, height: u32, left: f32) -> I420 {
    let mut canvas = I420::new(width, height, BACKGROUND);
    let cells = CAPTION.chars().count() as u32 * 6;
    // The caption spans about 80 % of the width (portrait or landscape), in even steps.
    let scale = ((width * 4 / 5) / cells.max(1)).max(2) & !1;
    let small = (scale / 2).max(2) & !1;
    let block = 7 * scale + 4 * scale + 7 * small;
    let top = height.saturating_sub(block) / 2;
    text(&mut canvas, CAPTION, top, scale);
    text(&mut canvas, SUBCAPTION, top + 11 * scale, small);
    // The countdown bar under the text, shrinking from the full caption width to nothing.
    let full = width * 4 / 5;
    let bar = (full as f32 * left.clamp(0.0, 1.0)) as u32;
    let y = top + block + 3 * scale;
    if bar >= 2 && y + scale <= height {
        canvas.fill(Rect::new((width - full) / 2, y, bar, scale.min(8)), BAR);
    }
    canvas
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Luma pixels brighter than the card: the caption's.
    fn text_pixels(p: &I420) -> usize {
        p.y.iter().filter(|v| **v > 200).count()
    }

    #[test]
    fn the_slate_has_a_caption_on_a_dark_card_in_any_shape() {
        // The smallest output (16x16) gets a clipped caption; it must only not fail.
        assert_eq!(render(16, 16, 0.5).y.len(), 256);
        for (w, h) in [(1280, 720), (360, 640), (320, 180), (96, 96)] {
            let p = render(w, h, 1.0);
            assert_eq!((p.width, p.height), (w, h));
            let lit = text_pixels(&p);
            assert!(lit > 0, "{w}x{h}: no caption");
            // Mostly card, not text, not black.
            assert!(lit < p.y.len() / 4, "{w}x{h}: {lit} lit of {}", p.y.len());
            assert_eq!(p.y[0], BACKGROUND.0);
        }
    }

    #[test]
    fn the_countdown_bar_shrinks_as_the_grace_period_runs_out() {
        let bar = |left| {
            render(360, 640, left)
                .y
                .iter()
                .filter(|v| **v == BAR.0)
                .count()
        };
        let (full, half, none) = (bar(1.0), bar(0.5), bar(0.0));
        assert!(full > half && half > none, "{full} {half} {none}");
        assert_eq!(none, 0);
    }

    #[test]
    fn every_caption_character_has_a_glyph() {
        for c in CAPTION.chars().chain(SUBCAPTION.chars()) {
            assert!(c == ' ' || glyph(c) != [0; 7], "{c:?}");
        }
    }
}
