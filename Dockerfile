# cohost container image. Untested here: no Docker engine runs on the development machines.
#
# Build:  docker build -t cohost .
# Run:    docker run --network host \
#           -e COHOST_SERVER__HTTP_LISTEN=0.0.0.0:8080 \
#           -e COHOST_WEBRTC__BIND_IP=0.0.0.0 \
#           -e COHOST_WEBRTC__PUBLIC_IPS='["<public IP>"]' \
#           -e COHOST_AUTH__SECRET='<long random secret>' \
#           cohost
#
# The config baked in (/etc/cohost/cohost.toml) holds the defaults, which listen on 127.0.0.1:
# unreachable from outside a container. In a container server.http_listen must be 0.0.0.0:8080
# (COHOST_SERVER__HTTP_LISTEN) and webrtc.bind_ip 0.0.0.0 (COHOST_WEBRTC__BIND_IP), and then a
# real auth.secret must be set (COHOST_AUTH__SECRET): the built-in development secret is refused
# off loopback and the server will not start with it.
# --network host avoids publishing 1000 UDP ports through Docker's port proxy.

FROM rust:1-bookworm AS build
# cmake and nasm build the Opus and OpenH264 libraries the bridge will use.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake nasm npm \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked
# The demo page's HTTP-FLV player (mpegts.js) comes from npm.
RUN npm ci --prefix web --no-audit --no-fund

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home --home-dir /opt/cohost cohost
COPY --from=build /src/target/release/cohost /usr/local/bin/cohost
COPY --from=build /src/web/ /opt/cohost/web/
COPY config/cohost.toml /etc/cohost/cohost.toml
WORKDIR /opt/cohost
ENV COHOST_CONFIG=/etc/cohost/cohost.toml \
    COHOST_SERVER__RTMP_LISTEN=0.0.0.0:1935 \
    COHOST_SERVER__HTTP_LISTEN=0.0.0.0:8080 \
    COHOST_WEBRTC__BIND_IP=0.0.0.0
# 8080: HTTP + WebSocket signaling; 1935: RTMP (play, ingest); 50000-50999: WebRTC media.
EXPOSE 8080/tcp 1935/tcp 50000-50999/udp
USER cohost
ENTRYPOINT ["cohost"]
CMD ["serve"]
