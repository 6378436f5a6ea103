//! The FLV/H.264 helpers checked against a real decoder: what cohost muxes, ffprobe reads.

use cohost::media::amf0::{self, Value};
use cohost::media::{flv, h264};
use openh264::encoder::Encoder;
use openh264::formats::YUVBuffer;

fn ffprobe(args: &[&str]) -> String {
    let out = std::process::Command::new("ffprobe")
        .args(["-v", "error"])
        .args(args)
        .output()
        .expect("ffprobe (Debian ffmpeg) must be installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn flv_mux_of_encoded_video_is_readable_by_ffprobe() {
    let (w, h, n) = (640usize, 360usize, 60u32);
    let mut enc = Encoder::new().unwrap();
    let mut out = flv::header(false, true).to_vec();
    let meta = amf0::ecma([
        ("width", Value::Number(w as f64)),
        ("height", Value::Number(h as f64)),
        ("framerate", Value::Number(30.0)),
        ("videocodecid", Value::Number(7.0)),
    ]);
    flv::write_tag(
        &mut out,
        flv::TAG_SCRIPT,
        0,
        &flv::script("onMetaData", &meta),
    );
    let mut have_config = false;
    for i in 0..n {
        let mut yuv = vec![128u8; w * h * 3 / 2];
        for (k, p) in yuv[..w * h].iter_mut().enumerate() {
            *p = ((k % w + i as usize * 3) % 256) as u8;
        }
        let bs = enc
            .encode(&YUVBuffer::from_vec(yuv, w, h))
            .unwrap()
            .to_vec();
        let nals = h264::split_annexb(&bs);
        let ts = i * 1000 / 30;
        if !have_config {
            let sps = nals
                .iter()
                .find(|x| h264::nal_type(x) == h264::NAL_SPS)
                .unwrap();
            let pps = nals
                .iter()
                .find(|x| h264::nal_type(x) == h264::NAL_PPS)
                .unwrap();
            assert_eq!(h264::sps_dimensions(sps), Some((w as u32, h as u32)));
            let cfg = h264::decoder_config(sps, pps).unwrap();
            flv::write_tag(
                &mut out,
                flv::TAG_VIDEO,
                ts,
                &flv::avc_sequence_header(&cfg),
            );
            have_config = true;
        }
        // Parameter sets travel in the sequence header; frames carry only slices.
        let key = nals.iter().any(|x| h264::nal_type(x) == h264::NAL_IDR);
        let slices = nals
            .iter()
            .copied()
            .filter(|x| !matches!(h264::nal_type(x), h264::NAL_SPS | h264::NAL_PPS));
        flv::write_tag(
            &mut out,
            flv::TAG_VIDEO,
            ts,
            &flv::avc_frame(key, 0, &h264::to_avcc(slices)),
        );
    }
    let dir = std::env::temp_dir().join(format!("cohost-flv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("out.flv");
    std::fs::write(&path, &out).unwrap();
    let p = path.to_str().unwrap();
    let streams = ffprobe(&[
        "-select_streams",
        "v:0",
        "-count_frames",
        "-show_entries",
        "stream=codec_name,width,height,nb_read_frames",
        "-of",
        "default=nw=1",
        p,
    ]);
    assert!(streams.contains("codec_name=h264"), "{streams}");
    assert!(streams.contains(&format!("width={w}")), "{streams}");
    assert!(streams.contains(&format!("height={h}")), "{streams}");
    assert!(
        streams.contains(&format!("nb_read_frames={n}")),
        "{streams}"
    );
    // And our own reader agrees with what we wrote.
    let mut r = flv::Reader::new();
    r.push(&out);
    let mut tags = 0;
    while let Some(_t) = r.next_tag().unwrap() {
        tags += 1;
    }
    assert_eq!(tags, n as usize + 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn aac_tones_survive_encode_mux_and_ffmpeg_decode() {
    use cohost::bridge::encode::AacEncoder;
    use cohost::bridge::mix::{Limiter, mix_into};
    use cohost::media::goertzel::tone_power;
    // Two voices (440 Hz and 660 Hz) mixed, encoded AAC-LC 48 kHz stereo, muxed in FLV.
    let tone =
        |f: f32, i: usize| ((i as f32 / 48000.0 * f * std::f32::consts::TAU).sin() * 9000.0) as i16;
    let a: Vec<i16> = (0..96000).map(|k| tone(440.0, k / 2)).collect();
    let b: Vec<i16> = (0..96000).map(|k| tone(660.0, k / 2)).collect();
    let mut mixed = vec![0i16; a.len()];
    mix_into(&mut mixed, &[&a, &b], &mut Limiter::default());
    let mut enc = AacEncoder::new(48000, true, 128_000).unwrap();
    let mut out = flv::header(true, false).to_vec();
    flv::write_tag(
        &mut out,
        flv::TAG_AUDIO,
        0,
        &flv::aac_sequence_header(&enc.asc),
    );
    let mut n = 0u32;
    for chunk in mixed.chunks(1920) {
        for frame in enc.push(chunk).unwrap() {
            flv::write_tag(
                &mut out,
                flv::TAG_AUDIO,
                n * 1024 / 48,
                &flv::aac_frame(&frame),
            );
            n += 1;
        }
    }
    let dir = std::env::temp_dir().join(format!("cohost-aac-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("a.flv");
    std::fs::write(&path, &out).unwrap();
    let dec = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(&path)
        .args(["-f", "s16le", "-ac", "1", "-ar", "48000", "-"])
        .output()
        .expect("ffmpeg");
    assert!(
        dec.status.success(),
        "{}",
        String::from_utf8_lossy(&dec.stderr)
    );
    let pcm: Vec<f32> = dec
        .stdout
        .chunks_exact(2)
        .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])))
        .collect();
    assert!(pcm.len() > 40_000, "decoded {} samples", pcm.len());
    let mid = &pcm[9600..pcm.len() - 4800];
    let (p440, p660, p1000) = (
        tone_power(mid, 48000.0, 440.0),
        tone_power(mid, 48000.0, 660.0),
        tone_power(mid, 48000.0, 1000.0),
    );
    assert!(
        p440 > 0.1 && p660 > 0.1,
        "both tones present: {p440} {p660}"
    );
    assert!(p1000 < 0.01, "no tone that was not sent: {p1000}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The fMP4 muxer behind recording and HLS, checked with ffprobe/ffmpeg: 4 s of 30 fps H.264
/// (a keyframe every second) and AAC, cut into ~300 ms fragments and at keyframes, with the
/// duration patched into the init segment the way a recorder closes a file.
#[test]
fn fmp4_of_encoded_video_and_audio_decodes_without_errors() {
    use cohost::bridge::encode::AacEncoder;
    use cohost::media::fmp4::{Fragmenter, init_segment};
    let (w, h, n) = (320usize, 240usize, 120u32);
    let mut enc = Encoder::new().unwrap();
    let mut aac = AacEncoder::new(48000, true, 64_000).unwrap();
    let mut tags = vec![];
    let mut have_config = false;
    let mut audio_frames = 0u32;
    for i in 0..n {
        let mut yuv = vec![128u8; w * h * 3 / 2];
        for (k, p) in yuv[..w * h].iter_mut().enumerate() {
            *p = ((k % w + i as usize * 3) % 256) as u8;
        }
        if i % 30 == 0 {
            enc.force_intra_frame();
        }
        let bs = enc
            .encode(&YUVBuffer::from_vec(yuv, w, h))
            .unwrap()
            .to_vec();
        let nals = h264::split_annexb(&bs);
        let ts = i * 1000 / 30;
        if !have_config {
            let sps = nals.iter().find(|x| h264::nal_type(x) == h264::NAL_SPS);
            let pps = nals.iter().find(|x| h264::nal_type(x) == h264::NAL_PPS);
            let cfg = h264::decoder_config(sps.unwrap(), pps.unwrap()).unwrap();
            tags.push(flv::Tag {
                kind: flv::TAG_VIDEO,
                timestamp_ms: 0,
                body: flv::avc_sequence_header(&cfg),
            });
            tags.push(flv::Tag {
                kind: flv::TAG_AUDIO,
                timestamp_ms: 0,
                body: flv::aac_sequence_header(&aac.asc),
            });
            have_config = true;
        }
        let key = nals.iter().any(|x| h264::nal_type(x) == h264::NAL_IDR);
        let slices = nals
            .iter()
            .copied()
            .filter(|x| !matches!(h264::nal_type(x), h264::NAL_SPS | h264::NAL_PPS));
        tags.push(flv::Tag {
            kind: flv::TAG_VIDEO,
            timestamp_ms: ts,
            body: flv::avc_frame(key, 0, &h264::to_avcc(slices)),
        });
        // 1600 samples of 48 kHz stereo per video frame.
        let pcm: Vec<i16> = (0..3200)
            .map(|k| (((k / 2) as f32 * 0.05).sin() * 5000.0) as i16)
            .collect();
        for frame in aac.push(&pcm).unwrap() {
            tags.push(flv::Tag {
                kind: flv::TAG_AUDIO,
                timestamp_ms: audio_frames * 1024 / 48,
                body: flv::aac_frame(&frame),
            });
            audio_frames += 1;
        }
    }
    let mut fr = Fragmenter::new();
    let mut body = vec![];
    let mut fragments = 0;
    let mut keyframe_cuts = 0;
    let mut total_ms = 0;
    for t in &tags {
        let p = fr.push(t).unwrap();
        assert!(p.flushed.is_none());
        if p.new_tracks {
            assert!(body.is_empty(), "one track set in this stream");
        }
        let Some(frame) = p.frame else { continue };
        if frame.video
            && (frame.keyframe || fr.pending_ms() >= 300)
            && let Some(f) = fr.cut()
        {
            keyframe_cuts += usize::from(frame.keyframe);
            assert!(!frame.keyframe || f.duration_ms > 0);
            total_ms += f.duration_ms;
            body.extend_from_slice(&f.bytes);
            fragments += 1;
        }
    }
    let last = fr.finish().unwrap();
    total_ms += last.duration_ms;
    body.extend_from_slice(&last.bytes);
    assert!(fragments >= 12, "{fragments} fragments");
    assert_eq!(keyframe_cuts, 3, "cut before the keyframes at 1, 2 and 3 s");
    assert!((3990..=4010).contains(&total_ms), "{total_ms} ms");
    let tracks = fr.tracks().unwrap().clone();
    let mut file = init_segment(&tracks, Some(0));
    file.extend_from_slice(&body);
    // Patch the duration in place, as a recorder does when it closes the file.
    let init = init_segment(&tracks, Some(total_ms));
    file[..init.len()].copy_from_slice(&init);

    let dir = std::env::temp_dir().join(format!("cohost-fmp4-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("out.mp4");
    std::fs::write(&path, &file).unwrap();
    let p = path.to_str().unwrap();
    let v = ffprobe(&[
        "-select_streams",
        "v:0",
        "-count_frames",
        "-show_entries",
        "stream=codec_name,width,height,nb_read_frames:format=duration",
        "-of",
        "default=nw=1",
        p,
    ]);
    assert!(v.contains("codec_name=h264"), "{v}");
    assert!(v.contains(&format!("width={w}")), "{v}");
    assert!(v.contains(&format!("height={h}")), "{v}");
    assert!(v.contains(&format!("nb_read_frames={n}")), "{v}");
    let duration: f64 = v
        .lines()
        .find_map(|l| l.strip_prefix("duration="))
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("no duration in {v}"));
    assert!((duration - 4.0).abs() < 0.1, "duration {duration}");
    let a = ffprobe(&[
        "-select_streams",
        "a:0",
        "-count_frames",
        "-show_entries",
        "stream=codec_name,sample_rate,channels,nb_read_frames",
        "-of",
        "default=nw=1",
        p,
    ]);
    assert!(a.contains("codec_name=aac"), "{a}");
    assert!(a.contains("sample_rate=48000"), "{a}");
    assert!(a.contains("channels=2"), "{a}");
    assert!(
        a.contains(&format!("nb_read_frames={audio_frames}")),
        "{a} vs {audio_frames}"
    );
    // A full decode with errors reported: nothing on stderr.
    let dec = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i", p, "-f", "null", "-"])
        .output()
        .expect("ffmpeg");
    assert!(dec.status.success());
    assert!(
        dec.stderr.is_empty(),
        "decode errors: {}",
        String::from_utf8_lossy(&dec.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
