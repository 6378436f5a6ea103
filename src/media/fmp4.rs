//! TEMPORARY STUB of the shared fMP4 muxer (the real one lands on main): the API the recorder
//! is written against, so the branch builds until the merge. Replaced wholesale by main's file.

use super::flv::Tag;

pub struct VideoTrack {
    pub avcc: Vec<u8>,
    pub width: u32,
    pub height: u32,
}
pub struct AudioTrack {
    pub asc: Vec<u8>,
    pub sample_rate: u32,
    pub channels: u8,
}
#[derive(Default, Clone, PartialEq, Eq, Debug)]
pub struct Tracks {
    pub video: Option<VideoTrack>,
    pub audio: Option<AudioTrack>,
}
impl Clone for VideoTrack {
    fn clone(&self) -> Self {
        Self {
            avcc: self.avcc.clone(),
            width: self.width,
            height: self.height,
        }
    }
}
impl PartialEq for VideoTrack {
    fn eq(&self, o: &Self) -> bool {
        self.avcc == o.avcc
    }
}
impl Eq for VideoTrack {}
impl std::fmt::Debug for VideoTrack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VideoTrack")
    }
}
impl Clone for AudioTrack {
    fn clone(&self) -> Self {
        Self {
            asc: self.asc.clone(),
            sample_rate: self.sample_rate,
            channels: self.channels,
        }
    }
}
impl PartialEq for AudioTrack {
    fn eq(&self, o: &Self) -> bool {
        self.asc == o.asc
    }
}
impl Eq for AudioTrack {}
impl std::fmt::Debug for AudioTrack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AudioTrack")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("fmp4 stub")]
pub struct Fmp4Error;

pub fn init_segment(_tracks: &Tracks, _duration_ms: Option<u64>) -> Vec<u8> {
    vec![]
}
pub struct Fragment {
    pub bytes: Vec<u8>,
    pub sequence: u32,
    pub start_ms: u64,
    pub duration_ms: u64,
    pub independent: bool,
}
pub struct Frame {
    pub video: bool,
    pub keyframe: bool,
    pub dts_ms: u64,
}
pub struct Pushed {
    pub new_tracks: bool,
    pub flushed: Option<Fragment>,
    pub frame: Option<Frame>,
}
#[derive(Default)]
pub struct Fragmenter;
impl Fragmenter {
    pub fn new() -> Self {
        Self
    }
    pub fn push(&mut self, _tag: &Tag) -> Result<Pushed, Fmp4Error> {
        Err(Fmp4Error)
    }
    pub fn tracks(&self) -> Option<&Tracks> {
        None
    }
    pub fn pending_ms(&self) -> u64 {
        0
    }
    pub fn cut(&mut self) -> Option<Fragment> {
        None
    }
    pub fn finish(&mut self) -> Option<Fragment> {
        None
    }
}
