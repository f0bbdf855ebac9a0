//! TLS and WebSocket termination ahead of the broker.
//!
//! rumqttd performs TLS and WebSocket handshakes inline in its accept loop, without a timeout:
//! one idle socket blocks every new connection. The gateway therefore never gives rumqttd a TLS
//! or WebSocket listener. It accepts those connections itself, runs each handshake in its own
//! task under a timeout (and caps how many may be pending), then splices the plain MQTT byte
//! stream to the broker's internal listener on loopback.
//!
//! With client certificates (mTLS), a device's certificate must carry its device id as a DNS
//! subject alternative name, and the MQTT CONNECT on that connection must use the same client
//! id: the proxy reads the CONNECT before forwarding anything.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, Reason};

/// `[mqtt.tls]`: an MQTT-over-TLS listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Address of the TLS listener (port 0: a free port).
    pub listen: SocketAddr,
    /// PEM certificate chain of the gateway.
    pub cert_file: PathBuf,
    /// PEM private key of the gateway.
    pub key_file: PathBuf,
    /// PEM CA certificates of device client certificates. When set, every TLS client must present
    /// a certificate whose DNS name is its device id (mTLS).
    pub client_ca_file: Option<PathBuf>,
}

/// Settings shared by the TLS and WebSocket edges.
#[derive(Debug, Clone, Copy)]
pub struct EdgeLimits {
    /// Longest a TLS or WebSocket handshake (and, with mTLS, the CONNECT) may take.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; more connections wait to be served.
    pub max_pending_handshakes: usize,
    /// Largest WebSocket message (and frame) taken from a client
    /// ([`EdgeLimits::websocket_message_bytes`]). A larger one closes the connection before it
    /// is buffered.
    pub max_websocket_message_bytes: usize,
}

impl EdgeLimits {
    /// The WebSocket message limit for a broker taking packets of up to `max_payload_bytes`: that
    /// plus 64 KiB of slack, for a client that packs a few small packets (acknowledgements,
    /// pings) into the same message as a large one.
    pub fn websocket_message_bytes(max_payload_bytes: usize) -> usize {
        max_payload_bytes.saturating_add(MAX_CONNECT_BYTES)
    }
}

/// Why an edge could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// A PEM file could not be read.
    #[error("{path}: {detail}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The client CA list was refused.
    #[error("client CA: {0}")]
    ClientCa(String),
}

fn pem_error(path: &std::path::Path) -> impl Fn(rustls::pki_types::pem::Error) -> EdgeError + '_ {
    move |e| EdgeError::Pem {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

/// Builds the rustls server configuration (ring provider).
pub fn server_config(config: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, EdgeError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_file_iter(&config.cert_file)
        .map_err(pem_error(&config.cert_file))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error(&config.cert_file))?;
    let key =
        PrivateKeyDer::from_pem_file(&config.key_file).map_err(pem_error(&config.key_file))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &config.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca_file).map_err(pem_error(ca_file))? {
                roots
                    .add(cert.map_err(pem_error(ca_file))?)
                    .map_err(|e| EdgeError::ClientCa(e.to_string()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| EdgeError::ClientCa(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    Ok(Arc::new(builder.with_single_cert(certs, key)?))
}

/// What MQTT protocol level a CONNECT asks for, and its client id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectHead {
    /// 4 (MQTT 3.1.1) or 5.
    pub level: u8,
    /// The client id.
    pub client_id: String,
}

/// Reads the variable-length "remaining length" at `buf[at..]`: (value, bytes used).
fn remaining_length(buf: &[u8], at: usize) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, byte) in buf.get(at..)?.iter().take(4).enumerate() {
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// The first bytes of a connection are not an MQTT CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not an MQTT CONNECT packet")]
pub struct NotConnect;

/// Parses the head of an MQTT CONNECT packet once `buf` holds all of it; `Ok(None)` asks for more
/// bytes.
pub fn parse_connect(buf: &[u8]) -> Result<Option<ConnectHead>, NotConnect> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] != 0x10 {
        return Err(NotConnect);
    }
    let Some((length, used)) = remaining_length(buf, 1) else {
        return if buf.len() >= 5 {
            Err(NotConnect)
        } else {
            Ok(None)
        };
    };
    let start = 1 + used;
    if buf.len() < start + length {
        return Ok(None);
    }
    let packet = &buf[start..start + length];
    // Protocol name "MQTT", level, flags, keep-alive.
    if packet.len() < 10 || &packet[..6] != b"\x00\x04MQTT" {
        return Err(NotConnect);
    }
    let level = packet[6];
    let mut at = 10;
    if level == 5 {
        let (props, used) = remaining_length(packet, at).ok_or(NotConnect)?;
        at += used + props;
    } else if level != 4 {
        return Err(NotConnect);
    }
    let id_len = usize::from(u16::from_be_bytes([
        *packet.get(at).ok_or(NotConnect)?,
        *packet.get(at + 1).ok_or(NotConnect)?,
    ]));
    let id = packet.get(at + 2..at + 2 + id_len).ok_or(NotConnect)?;
    let client_id = std::str::from_utf8(id).map_err(|_| NotConnect)?.to_owned();
    Ok(Some(ConnectHead { level, client_id }))
}

/// Where spliced connections go: the broker's internal listeners.
#[derive(Debug, Clone, Copy)]
pub struct Upstream {
    /// MQTT 3.1.1 listener.
    pub v4: SocketAddr,
    /// MQTT 5 listener, if any.
    pub v5: Option<SocketAddr>,
}

/// Reads the CONNECT from `stream` into `buf`, checks it against the certificate identity (if
/// any), and returns the broker listener for its protocol level.
async fn read_connect<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    upstream: Upstream,
    identity: Option<&CertificateDer<'_>>,
) -> Result<SocketAddr, &'static str> {
    let head = loop {
        match parse_connect(buf) {
            Ok(Some(head)) => break head,
            Ok(None) if buf.len() > MAX_CONNECT_BYTES => return Err("connect_too_large"),
            Ok(None) => {
                if stream.read_buf(buf).await.map_err(|_| "io")? == 0 {
                    return Err("closed");
                }
            }
            Err(NotConnect) => return Err("not_mqtt"),
        }
    };
    if let Some(cert) = identity {
        let cert = webpki::EndEntityCert::try_from(cert).map_err(|_| "bad_certificate")?;
        let name =
            ServerName::try_from(head.client_id.as_str()).map_err(|_| "certificate_mismatch")?;
        cert.verify_is_valid_for_subject_name(&name)
            .map_err(|_| "certificate_mismatch")?;
    }
    route(&head, upstream)
}

/// Largest CONNECT read before the client is refused: a CONNECT holds a client id, credentials
/// and perhaps a will, far less; a client announcing more only wants the gateway's memory.
const MAX_CONNECT_BYTES: usize = 64 * 1024;

/// The broker listener for a CONNECT's protocol level.
fn route(head: &ConnectHead, upstream: Upstream) -> Result<SocketAddr, &'static str> {
    match head.level {
        5 => upstream.v5.ok_or("mqtt5_disabled"),
        _ => Ok(upstream.v4),
    }
}

async fn splice<S: AsyncRead + AsyncWrite + Unpin>(
    mut client: S,
    first: BytesMut,
    to: SocketAddr,
) -> std::io::Result<()> {
    let mut broker = TcpStream::connect(to).await?;
    broker.set_nodelay(true)?;
    broker.write_all(&first).await?;
    tokio::io::copy_bidirectional(&mut client, &mut broker).await?;
    Ok(())
}

fn refused(metrics: &Metrics, reason: &'static str, peer: SocketAddr) {
    metrics
        .edge_refusals
        .get_or_create(&Reason { reason })
        .inc();
    tracing::debug!(%peer, reason, "edge connection refused");
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Accepts connections until `shutdown`; each runs `handshake` in its own task under the
/// handshake timeout (at most `max_pending_handshakes` at once), then `serve`. A slow or silent
/// client therefore never delays anybody else's handshake.
async fn accept_loop<H, HF, C, S, SF>(
    what: &'static str,
    listener: TcpListener,
    limits: EdgeLimits,
    metrics: Metrics,
    shutdown: CancellationToken,
    handshake: H,
    serve: S,
) where
    H: Fn(TcpStream) -> HF + Clone + Send + 'static,
    HF: std::future::Future<Output = Result<C, &'static str>> + Send,
    C: Send + 'static,
    S: Fn(C) -> SF + Clone + Send + 'static,
    SF: std::future::Future<Output = Result<(), BoxError>> + Send,
{
    let pending = Arc::new(Semaphore::new(limits.max_pending_handshakes));
    loop {
        let (socket, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, what, "accept failed");
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Ok(permit) = pending.clone().acquire_owned().await else {
            break;
        };
        let (metrics, handshake, serve) = (metrics.clone(), handshake.clone(), serve.clone());
        tokio::spawn(async move {
            let result = tokio::time::timeout(limits.handshake_timeout, handshake(socket)).await;
            drop(permit);
            match result {
                Ok(Ok(connection)) => {
                    if let Err(e) = serve(connection).await {
                        tracing::debug!(%peer, what, error = %e, "connection ended");
                    }
                }
                Ok(Err(reason)) => refused(&metrics, reason, peer),
                Err(_) => refused(&metrics, "handshake_timeout", peer),
            }
        });
    }
}

/// Serves MQTT over TLS on `listener` until `shutdown`.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    upstream: Upstream,
    limits: EdgeLimits,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let handshake = move |socket: TcpStream| {
        let acceptor = acceptor.clone();
        async move {
            let mut stream = acceptor.accept(socket).await.map_err(|_| "tls_handshake")?;
            let mut first = BytesMut::new();
            let cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .cloned();
            let to = read_connect(&mut stream, &mut first, upstream, cert.as_ref()).await?;
            Ok((stream, first, to))
        }
    };
    let serve = |(stream, first, to)| async move {
        splice(stream, first, to).await.map_err(BoxError::from)
    };
    accept_loop("tls", listener, limits, metrics, shutdown, handshake, serve).await;
}

/// Serves MQTT over WebSocket (subprotocol `mqtt`, binary frames) on `listener` until `shutdown`.
pub async fn serve_websocket(
    listener: TcpListener,
    upstream: Upstream,
    limits: EdgeLimits,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    // tungstenite's defaults (64 MiB messages, 16 MiB frames) would let one client make the
    // gateway buffer far more than any packet the broker takes.
    let websocket_config = WebSocketConfig::default()
        .max_message_size(Some(limits.max_websocket_message_bytes))
        .max_frame_size(Some(limits.max_websocket_message_bytes));
    let handshake = move |socket: TcpStream| async move {
        #[allow(clippy::result_large_err)] // the callback's signature is tungstenite's
        let accepted = tokio_tungstenite::accept_hdr_async_with_config(
            socket,
            |request: &Request, mut response: Response| {
                let asks_mqtt = request
                    .headers()
                    .get("sec-websocket-protocol")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.split(',').any(|p| p.trim() == "mqtt"));
                if asks_mqtt {
                    response
                        .headers_mut()
                        .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
                }
                Ok(response)
            },
            Some(websocket_config),
        )
        .await;
        let mut ws = accepted.map_err(|_| "websocket_handshake")?;
        // The CONNECT belongs to the handshake: read under its timeout and size limit, so a
        // client that stalls or announces a huge packet is refused like any other.
        let mut first = BytesMut::new();
        let head = loop {
            match parse_connect(&first) {
                Ok(Some(head)) => break head,
                Ok(None) if first.len() > MAX_CONNECT_BYTES => return Err("connect_too_large"),
                Ok(None) => match ws.next().await {
                    Some(Ok(WsMessage::Binary(data))) => first.extend_from_slice(&data),
                    Some(Ok(WsMessage::Close(_))) | None => return Err("closed"),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        return Err(match WebSocketEnd::from(e) {
                            WebSocketEnd::MessageTooLarge => "websocket_message_too_large",
                            _ => "io",
                        })
                    }
                },
                Err(NotConnect) => return Err("not_mqtt"),
            }
        };
        Ok((ws, first, route(&head, upstream)?))
    };
    let counted = metrics.clone();
    let serve = move |(ws, first, to)| {
        let metrics = counted.clone();
        async move {
            let result = bridge_websocket(ws, first, to).await;
            if let Err(WebSocketEnd::MessageTooLarge) = result {
                metrics
                    .edge_refusals
                    .get_or_create(&Reason {
                        reason: "websocket_message_too_large",
                    })
                    .inc();
            }
            result.map_err(BoxError::from)
        }
    };
    accept_loop(
        "websocket",
        listener,
        limits,
        metrics,
        shutdown,
        handshake,
        serve,
    )
    .await;
}

/// Why a spliced WebSocket connection ended in error.
#[derive(Debug, thiserror::Error)]
enum WebSocketEnd {
    /// The client sent a message or frame over the limit.
    #[error("WebSocket message over the limit")]
    MessageTooLarge,
    /// The WebSocket protocol was broken.
    #[error("WebSocket: {0}")]
    WebSocket(#[source] tokio_tungstenite::tungstenite::Error),
    /// The socket to the client or to the broker failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl From<tokio_tungstenite::tungstenite::Error> for WebSocketEnd {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        use tokio_tungstenite::tungstenite::error::{CapacityError, Error};
        match e {
            Error::Capacity(CapacityError::MessageTooLong { .. }) => Self::MessageTooLarge,
            Error::Io(e) => Self::Io(e),
            e => Self::WebSocket(e),
        }
    }
}

/// Splices a WebSocket whose CONNECT (`first`) is read to the broker listener `to`.
async fn bridge_websocket(
    ws: tokio_tungstenite::WebSocketStream<TcpStream>,
    first: BytesMut,
    to: SocketAddr,
) -> Result<(), WebSocketEnd> {
    let (mut ws_tx, mut ws_rx) = ws.split();
    let broker = TcpStream::connect(to).await?;
    broker.set_nodelay(true)?;
    let (mut from_broker, mut to_broker) = broker.into_split();
    to_broker.write_all(&first).await?;
    let inbound = async move {
        while let Some(message) = ws_rx.next().await {
            match message? {
                WsMessage::Binary(data) => to_broker.write_all(&data).await?,
                WsMessage::Close(_) => break,
                _ => {}
            }
        }
        to_broker.shutdown().await?;
        Ok::<_, WebSocketEnd>(())
    };
    let outbound = async move {
        let mut buf = BytesMut::with_capacity(16 * 1024);
        loop {
            if from_broker.read_buf(&mut buf).await? == 0 {
                break;
            }
            let chunk = buf.split().freeze();
            ws_tx.send(WsMessage::Binary(chunk)).await?;
            buf.reserve(16 * 1024);
        }
        let _ = ws_tx.close().await;
        Ok::<_, WebSocketEnd>(())
    };
    tokio::select! {
        r = inbound => r,
        r = outbound => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(level: u8, client_id: &str) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, 0x02, 0, 30];
        if level == 5 {
            body.push(0); // no properties
        }
        body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
        body.extend_from_slice(client_id.as_bytes());
        let mut packet = vec![0x10, body.len() as u8];
        packet.extend(body);
        packet
    }

    #[test]
    fn parses_connect_heads_incrementally() {
        for level in [4, 5] {
            let packet = connect(level, "elev-1");
            for cut in 0..packet.len() {
                assert_eq!(
                    parse_connect(&packet[..cut]),
                    Ok(None),
                    "level {level}, {cut} bytes"
                );
            }
            assert_eq!(
                parse_connect(&packet),
                Ok(Some(ConnectHead {
                    level,
                    client_id: "elev-1".into()
                }))
            );
        }
        assert_eq!(parse_connect(b"GET / HTTP/1.1\r\n"), Err(NotConnect));
        assert_eq!(
            parse_connect(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Err(NotConnect)
        );
    }
}
