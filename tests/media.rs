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
