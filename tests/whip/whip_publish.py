#!/usr/bin/env python3
"""A WHIP publisher built on aiortc (an independent WebRTC stack): sends H.264 (libx264 in
PyAV's wheels, forced by codec preference) pictures of one solid colour and an Opus sine tone
to a WHIP endpoint, the way OBS or a hardware encoder would (one POST with a complete offer,
no trickle).

Prints one JSON object per line on stdout: {"event": "created", "status": 201, "location": ...}
then {"event": "state", "state": "connected"}, ... Runs until stdin closes or it is killed.
Loopback only: ICE host candidates are limited to 127.0.0.1 and no STUN server is used.
"""

import argparse
import asyncio
import fractions
import json
import math
import struct
import sys
import urllib.error
import urllib.request

import aioice.ice

# Tests run on loopback only: aioice leaves 127.0.0.1 out of its host candidates by default.
aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=False: ["127.0.0.1"]

from aiortc import (  # noqa: E402
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from av import AudioFrame, VideoFrame  # noqa: E402


def say(**kw):
    print(json.dumps(kw), flush=True)


def rgb_to_yuv(r, g, b):
    # BT.601 limited range, what H.264 decoders assume without colour metadata.
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    return [max(0, min(255, int(round(c)))) for c in (y, u, v)]


class ColourTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, rgb, width=320, height=240, fps=15):
        super().__init__()
        self.yuv = rgb_to_yuv(*rgb)
        self.width, self.height, self.fps = width, height, fps
        self.n = 0
        self.start = None

    async def recv(self):
        loop = asyncio.get_running_loop()
        if self.start is None:
            self.start = loop.time()
        due = self.start + self.n / self.fps
        await asyncio.sleep(max(0.0, due - loop.time()))
        frame = VideoFrame(width=self.width, height=self.height, format="yuv420p")
        for plane, value in zip(frame.planes, self.yuv):
            plane.update(bytes([value]) * plane.buffer_size)
        frame.pts = self.n * (90000 // self.fps)
        frame.time_base = fractions.Fraction(1, 90000)
        self.n += 1
        return frame


class ToneTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(self, hz, rate=48000, ptime=0.02):
        super().__init__()
        self.hz, self.rate = hz, rate
        self.samples = int(rate * ptime)
        self.n = 0
        self.start = None

    async def recv(self):
        loop = asyncio.get_running_loop()
        if self.start is None:
            self.start = loop.time()
        due = self.start + self.n * self.samples / self.rate
        await asyncio.sleep(max(0.0, due - loop.time()))
        first = self.n * self.samples
        pcm = struct.pack(
            "<%dh" % self.samples,
            *(
                int(10000 * math.sin(2 * math.pi * self.hz * (first + k) / self.rate))
                for k in range(self.samples)
            ),
        )
        frame = AudioFrame(format="s16", layout="mono", samples=self.samples)
        frame.planes[0].update(pcm)
        frame.sample_rate = self.rate
        frame.pts = first
        frame.time_base = fractions.Fraction(1, self.rate)
        self.n += 1
        return frame


def post(url, token, sdp):
    req = urllib.request.Request(
        url,
        data=sdp.encode(),
        method="POST",
        headers={"Content-Type": "application/sdp", "Authorization": "Bearer " + token},
    )
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--rgb", default="30,30,220")
    ap.add_argument("--tone", type=float, default=440.0)
    args = ap.parse_args()
    rgb = [int(c) for c in args.rgb.split(",")]

    # No STUN server: aiortc would otherwise ask a public one.
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))

    @pc.on("connectionstatechange")
    async def on_state():
        say(event="state", state=pc.connectionState)

    video = pc.addTransceiver(ColourTrack(rgb), direction="sendonly")
    h264 = [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType == "video/H264"]
    video.setCodecPreferences(h264)
    pc.addTransceiver(ToneTrack(args.tone), direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())  # gathers every candidate
    status, headers, body = await asyncio.to_thread(post, args.url, args.token, pc.localDescription.sdp)
    if status != 201:
        say(event="error", status=status, body=body)
        await pc.close()
        return 1
    say(
        event="created",
        status=status,
        location=headers.get("Location"),
        etag=headers.get("ETag"),
        content_type=headers.get("Content-Type"),
    )
    await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
    # Until the test closes stdin (or kills us).
    await asyncio.to_thread(sys.stdin.read)
    await pc.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
