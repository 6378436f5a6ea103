//! `--scenario rooms`, mixed cases (`cohost1`, `cohost3`, `pk`): ffmpeg composing the same
//! pictures side by side with cohost's bridges. Per room one `ffmpeg` process reads the same
//! clips the room's participants publish (the 360x640 host clip, the 320x480 co-host clip;
//! for PK the host clip twice: its own host and the partner's), each `-re`, looped, plus a tone
//! per participant; it crops and scales each into the tile the bridge uses (the bridge's own
//! layout code: `pip` for co-hosts, `side_by_side` for PK, `crop` fit, at the host's size or
//! `--rooms-out`),
//! mixes the tones, and encodes libx264 `veryfast` + `zerolatency` at the bridge's default
//! 2.5 Mbit/s and AAC to FLV on /dev/null (`bridge_bench::composite_command`, the same peer as
//! `--scenario bridge`). Counted: the
//! ffmpeg processes' CPU. Not in ffmpeg's share, but in cohost's: receiving every
//! participant over WebRTC and the SFU forwarding them to each other, which a room needs
//! whoever mixes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, anyhow, bail};

use cohost::bridge::layout::{Fit, Layout, fit, tiles};

use crate::bridge_bench::{clip_mkv, composite_command, progress_value, write_wav};
use crate::rooms::{COHOST, Case, Opts, RoomsResult, clip_for, fill_cpu, fill_output_between};
use crate::stats::{cpu_seconds, rss_bytes};

/// The filter graph of one room: a black canvas of `w`x`h`, input `i` (of `sizes`, in
/// participant order) cropped and scaled into its tile, and the `n` tones (inputs `n..2n`)
/// mixed.
pub fn graph(layout: Layout, sizes: &[(u32, u32)], w: u32, h: u32) -> String {
    let n = sizes.len();
    let mut g = format!("color=c=black:s={w}x{h}:r=30,format=yuv420p[b0];");
    for (i, (t, (sw, sh))) in tiles(layout, n, w, h).iter().zip(sizes).enumerate() {
        let (src, dst) = fit(Fit::Crop, *sw, *sh, *t);
        g += &format!(
            "[{i}:v]crop={}:{}:{}:{},scale={}:{},setsar=1[s{i}];\
             [b{i}][s{i}]overlay=x={}:y={}:shortest=0:eof_action=repeat[b{}];",
            src.w,
            src.h,
            src.x,
            src.y,
            dst.w,
            dst.h,
            dst.x,
            dst.y,
            i + 1
        );
    }
    g += &format!("[b{n}]null[v];");
    let audio: String = (0..n).map(|i| format!("[{}:a]", n + i)).collect();
    if n > 1 {
        g += &format!("{audio}amix=inputs={n}:normalize=0[a]");
    } else {
        g += &format!("{audio}anull[a]");
    }
    g
}

pub async fn ffmpeg_mix(o: &Opts) -> anyhow::Result<RoomsResult> {
    crate::rooms::in_temp_dir("rooms-mix", async |dir| run(o, dir).await).await
}

async fn run(o: &Opts, dir: &Path) -> anyhow::Result<RoomsResult> {
    let hs = o.case.host();
    let host = (hs.w as u32, hs.h as u32);
    let host_clip = clip_for(hs, o.content).await?;
    let host_mkv = clip_mkv(&host_clip, dir, "host").await?;
    let mut inputs: Vec<(PathBuf, (u32, u32))> = vec![(host_mkv.clone(), host)];
    let layout = if o.case == Case::Pk {
        inputs.push((host_mkv, host));
        Layout::SideBySide
    } else {
        let c = COHOST;
        let clip = clip_for(c, o.content).await?;
        let mkv = clip_mkv(&clip, dir, "cohost").await?;
        for _ in 0..o.case.cohosts() {
            inputs.push((mkv.clone(), (c.w as u32, c.h as u32)));
        }
        Layout::Pip
    };
    let tone = dir.join("tone-mix.wav");
    write_wav(&tone, 440.0, 4)?;
    let sizes: Vec<(u32, u32)> = inputs.iter().map(|i| i.1).collect();
    let (w, h) = o.out.unwrap_or(host);
    let g = graph(layout, &sizes, w, h);
    let mut procs = vec![];
    for r in 0..o.rooms {
        let progress = dir.join(format!("progress-{r}.txt"));
        let videos: Vec<&Path> = inputs.iter().map(|(p, _)| p.as_path()).collect();
        let mut cmd = composite_command(&videos, &tone, &g, &progress);
        let child = cmd.spawn().context("ffmpeg (Debian's, with libx264)")?;
        let pid = child.id().context("ffmpeg pid")?;
        procs.push((child, pid, progress));
    }
    tokio::time::sleep(o.warmup).await;
    let snap = |procs: &[(tokio::process::Child, u32, PathBuf)]| -> (Option<f64>, Vec<(u64, u64)>) {
        let cpu = procs.iter().map(|p| cpu_seconds(p.1)).sum::<Option<f64>>();
        let prog = procs
            .iter()
            .map(|p| {
                (
                    progress_value(&p.2, "frame").unwrap_or(0),
                    progress_value(&p.2, "total_size").unwrap_or(0),
                )
            })
            .collect();
        (cpu, prog)
    };
    let (c0, f0, t0) = {
        let (c, f) = snap(&procs);
        (c, f, Instant::now())
    };
    tokio::time::sleep(o.window).await;
    let (c1, f1) = snap(&procs);
    let secs = t0.elapsed().as_secs_f64();
    let mut r = RoomsResult {
        system: "ffmpeg-x264".into(),
        case: o.case.name().into(),
        rooms: o.rooms,
        publishers: o.rooms,
        paths: format!("{layout:?} composite, libx264 veryfast 2.5 Mbit/s"),
        ..Default::default()
    };
    r.rss_mib = procs.iter().filter_map(|p| rss_bytes(p.1)).sum::<u64>() as f64 / (1024.0 * 1024.0);
    for (i, p) in procs.iter_mut().enumerate() {
        if let Ok(Some(st)) = p.0.try_wait() {
            r.errors.push(format!("ffmpeg of room {i} exited: {st}"));
        }
    }
    let (Some(c0), Some(c1)) = (c0, c1) else {
        bail!("no CPU time for an ffmpeg process (one exited?)");
    };
    fill_cpu(&mut r, (c1 - c0) / secs);
    let fps = fill_output_between(&mut r, &f0, &f1, secs);
    for (i, f) in fps.iter().enumerate() {
        if *f <= 0.0 {
            r.errors
                .push(format!("room {i}: ffmpeg made no frame in the window"));
        }
    }
    r.valid = r.errors.is_empty();
    for (mut c, _, _) in procs {
        let _ = c.kill().await;
    }
    if r.rooms_with_output == 0 {
        return Err(anyhow!("no ffmpeg output at all"));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_graph_puts_each_input_in_the_bridges_tile() {
        let g = graph(Layout::Pip, &[(360, 640), (320, 480)], 360, 640);
        // The host fills the canvas; the co-host's tile is the bridge's pip tile.
        let t = tiles(Layout::Pip, 2, 360, 640);
        assert!(g.contains("[0:v]crop=360:640:0:0,scale=360:640"), "{g}");
        assert!(
            g.contains(&format!("overlay=x={}:y={}", t[1].x, t[1].y)),
            "{g}"
        );
        assert!(g.ends_with("[2:a][3:a]amix=inputs=2:normalize=0[a]"), "{g}");
    }
}
