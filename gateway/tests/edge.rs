//! TLS (with client certificates) and WebSocket listeners terminated ahead of the broker: idle
//! sockets never block handshakes, a certificate binds its device id, browsers' MQTT works.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{connect_packet, envelope, login, provision, servers, Replica, WAIT};
use futures::{SinkExt, StreamExt};
use liftwire_gateway::acl::DeviceKind;
use liftwire_gateway::edge::TlsConfig;
use liftwire_proto::mqtt;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// A CA, a server certificate for localhost, and a client certificate for `device`.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertificateDer<'static>,
    client_chain: Vec<CertificateDer<'static>>,
    client_key: PrivateKeyDer<'static>,
}

fn pki(device: &str) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec![device.to_owned()])
        .unwrap()
        .signed_by(&client_key, &ca)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    Pki {
        dir,
        ca: ca.der().clone(),
        client_chain: vec![client.der().clone()],
        client_key: PrivateKeyDer::try_from(client_key.serialize_der()).unwrap(),
    }
}

async fn tls_client(
    pki: &Pki,
    addr: std::net::SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(pki.client_chain.clone(), pki.client_key.clone_key())
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_sockets_do_not_block_tls_handshakes_and_certificates_bind_the_device() {
    let (nats, pg) = servers().await;
    let pki = pki("elev-1");
    let dir = pki.dir.path().to_owned();
    let gw = Replica::start_with(&nats, &pg, "gw-1", move |mqtt| {
        mqtt.tls = Some(TlsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            cert_file: dir.join("server.pem"),
            key_file: dir.join("server.key"),
            client_ca_file: Some(dir.join("ca.pem")),
        });
        // Long enough that a loaded machine still completes the honest clients' handshakes.
        mqtt.handshake_timeout = Duration::from_secs(3);
    })
    .await;
    let tls_addr = gw.tls_addr.unwrap();
    let secret = provision(&gw, "b1", "elev-1", DeviceKind::Elevator).await;
    let other = provision(&gw, "b1", "elev-2", DeviceKind::Elevator).await;

    // Sockets that connect and never say anything (rumqttd's accept loop would hang on them).
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(tokio::net::TcpStream::connect(tls_addr).await.unwrap());
    }

    let started = tokio::time::Instant::now();
    let mut device = tls_client(&pki, tls_addr).await;
    login(&mut device, "elev-1", &secret).await;
    // Handshakes one after another would wait out each idle socket's 3 s timeout (>= 15 s).
    assert!(
        started.elapsed() < Duration::from_secs(7),
        "served while idle sockets were pending"
    );
    // An MQTT publish over TLS goes through the same guard and bridge.
    let topic = "lw/v1/b1/elev-1/up/event";
    let payload = envelope("elev-1", 1);
    let mut publish = vec![0x30, (2 + topic.len() + payload.len()) as u8];
    publish.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    publish.extend_from_slice(topic.as_bytes());
    publish.extend_from_slice(&payload);
    device.write_all(&publish).await.unwrap();

    // The idle sockets are closed once the handshake timeout passes.
    for mut socket in idle {
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(WAIT, socket.read(&mut buf))
            .await
            .expect("closed by the gateway");
        assert!(matches!(read, Ok(0) | Err(_)));
    }

    // A certificate for elev-1 cannot be used to log in as elev-2, even with elev-2's secret.
    let mut impostor = tls_client(&pki, tls_addr).await;
    impostor
        .write_all(&connect_packet("elev-2", &other))
        .await
        .unwrap();
    let mut buf = [0u8; 4];
    let read = tokio::time::timeout(WAIT, impostor.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "no CONNACK for a mismatched certificate"
    );

    let js = async_nats::jetstream::new(nats.client().await.unwrap());
    let mut stream = js.get_stream("LW_UPLINK").await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while stream.info().await.unwrap().state.messages < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the TLS publish never reached JetStream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = gw.metrics();
    assert!(
        metrics.contains("liftwire_gateway_edge_refusals_total{reason=\"handshake_timeout\"} 5"),
        "{metrics}"
    );
    assert!(
        metrics.contains("liftwire_gateway_edge_refusals_total{reason=\"certificate_mismatch\"} 1"),
        "{metrics}"
    );
    gw.stop().await;
}

type WebSocket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Opens a WebSocket to the gateway asking for the `mqtt` subprotocol, as browsers do.
async fn open_websocket(
    addr: std::net::SocketAddr,
) -> (
    WebSocket,
    tokio_tungstenite::tungstenite::handshake::client::Response,
) {
    let mut request = format!("ws://{addr}/mqtt").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "mqtt".parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_tungstenite::client_async(request, tcp).await.unwrap()
}

/// Waits for the gateway to close `ws` (a close frame, an error or the end of the stream).
async fn closed_by_gateway(ws: &mut WebSocket) {
    let end = tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the gateway closed the WebSocket");
}

#[tokio::test(flavor = "multi_thread")]
async fn browsers_speak_mqtt_over_websocket() {
    let (nats, pg) = servers().await;
    let gw = Replica::start_with(&nats, &pg, "gw-1", |mqtt| {
        mqtt.listen_ws = Some("127.0.0.1:0".parse().unwrap())
    })
    .await;
    let ws_addr = gw.ws_addr.unwrap();
    let secret = provision(&gw, "b1", "screen-1", DeviceKind::Screen).await;

    let (mut ws, response) = open_websocket(ws_addr).await;
    assert_eq!(
        response.headers().get("sec-websocket-protocol").unwrap(),
        "mqtt"
    );
    let packet = connect_packet("screen-1", &secret);
    // Split across frames, as a browser may.
    ws.send(Message::Binary(packet[..5].to_vec().into()))
        .await
        .unwrap();
    ws.send(Message::Binary(packet[5..].to_vec().into()))
        .await
        .unwrap();
    let reply = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // On failure, the metrics say why (a refused login, a refused packet, a handshake).
    assert_eq!(
        reply.into_data().as_ref(),
        mqtt::CONNACK_ACCEPTED,
        "{}",
        gw.metrics()
    );
    assert!(gw.metrics().contains("liftwire_gateway_connections 1"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_clients_that_stall_or_inflate_their_connect_are_refused_like_any_handshake() {
    let (nats, pg) = servers().await;
    let gw = Replica::start_with(&nats, &pg, "gw-1", |mqtt| {
        mqtt.listen_ws = Some("127.0.0.1:0".parse().unwrap());
        mqtt.handshake_timeout = Duration::from_secs(3);
    })
    .await;
    let ws_addr = gw.ws_addr.unwrap();
    let secret = provision(&gw, "b1", "screen-1", DeviceKind::Screen).await;
    let open = || async { open_websocket(ws_addr).await.0 };
    let closed = |mut ws: WebSocket| async move { closed_by_gateway(&mut ws).await };

    // Upgrades, then never sends its CONNECT.
    let silent = open().await;
    // Announces a CONNECT of 256 MiB and starts sending it.
    let mut inflated = open().await;
    let mut head = vec![0x10, 0xff, 0xff, 0xff, 0x7f];
    head.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4]);
    inflated.send(Message::Binary(head.into())).await.unwrap();
    for _ in 0..3 {
        inflated
            .send(Message::Binary(vec![0u8; 32 * 1024].into()))
            .await
            .unwrap();
    }
    closed(inflated).await;
    closed(silent).await;

    // Everybody else still gets in.
    let mut screen = open().await;
    screen
        .send(Message::Binary(connect_packet("screen-1", &secret).into()))
        .await
        .unwrap();
    let reply = tokio::time::timeout(WAIT, screen.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(reply.into_data().as_ref(), mqtt::CONNACK_ACCEPTED);
    let metrics = gw.metrics();
    assert!(
        metrics.contains("liftwire_gateway_edge_refusals_total{reason=\"connect_too_large\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("liftwire_gateway_edge_refusals_total{reason=\"handshake_timeout\"} 1"),
        "{metrics}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_messages_larger_than_any_packet_close_only_their_connection() {
    let (nats, pg) = servers().await;
    let gw = Replica::start_with(&nats, &pg, "gw-1", |mqtt| {
        mqtt.listen_ws = Some("127.0.0.1:0".parse().unwrap())
    })
    .await;
    let ws_addr = gw.ws_addr.unwrap();
    let limit = liftwire_gateway::edge::EdgeLimits::websocket_message_bytes(
        liftwire_gateway::MqttConfig::default().max_payload_bytes,
    );
    let mut screens = Vec::new();
    for id in ["screen-1", "screen-2"] {
        let secret = provision(&gw, "b1", id, DeviceKind::Screen).await;
        let (mut ws, _) = open_websocket(ws_addr).await;
        ws.send(Message::Binary(connect_packet(id, &secret).into()))
            .await
            .unwrap();
        let reply = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(reply.into_data().as_ref(), mqtt::CONNACK_ACCEPTED);
        screens.push(ws);
    }
    let mut polite = screens.pop().unwrap();
    let mut greedy = screens.pop().unwrap();

    // One message a byte over the limit: refused as it arrives, not buffered and handed on.
    let _ = greedy
        .send(Message::Binary(vec![0u8; limit + 1].into()))
        .await;
    closed_by_gateway(&mut greedy).await;
    // Counted as the connection's task ends, just after the socket closes.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !gw
        .metrics()
        .contains("liftwire_gateway_edge_refusals_total{reason=\"websocket_message_too_large\"} 1")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not counted: {}",
            gw.metrics()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The other screen's connection is untouched.
    polite
        .send(Message::Binary(mqtt::PINGREQ.to_vec().into()))
        .await
        .unwrap();
    let reply = tokio::time::timeout(WAIT, polite.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(reply.into_data().as_ref(), [0xD0, 0x00], "PINGRESP");
    gw.stop().await;
}
