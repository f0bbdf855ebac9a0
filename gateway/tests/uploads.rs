//! Device uploads go straight to object storage through a presigned URL; the bus only carries
//! the object reference.

#![allow(clippy::unwrap_used)]

mod common;

use common::{provision, servers, Device, Replica};
use liftwire_gateway::acl::DeviceKind;
use liftwire_gateway::uploads::UploadsConfig;
use liftwire_proto::{v1, Message, Timestamp, SCHEMA_VERSION};
use liftwire_testkit::S3;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn upload_request(seq: u64, size: u64, sha256: Vec<u8>) -> Vec<u8> {
    upload_request_of(seq, size, sha256, "application/gzip")
}

fn upload_request_of(seq: u64, size: u64, sha256: Vec<u8>, content_type: &str) -> Vec<u8> {
    v1::Envelope {
        schema_version: SCHEMA_VERSION,
        device_id: "elev-1".into(),
        seq,
        device_time: Some(Timestamp {
            seconds: 1_795_000_000,
            nanos: 0,
        }),
        body: Some(v1::envelope::Body::UploadRequest(v1::UploadRequest {
            request_id: format!("r-{seq}"),
            content_type: content_type.into(),
            size,
            sha256,
            purpose: "diagnostics".into(),
        })),
    }
    .encode_to_vec()
}

/// A bare HTTP/1.1 PUT: the device holds no storage credentials, only the URL.
async fn http_put(url: &str, content_type: &str, body: &[u8]) -> u16 {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let head = format!("PUT {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    std::str::from_utf8(&response[9..12])
        .unwrap()
        .parse()
        .unwrap()
}

async fn grant(device: &mut Device) -> v1::UploadGrant {
    loop {
        let (topic, payload, _) = device.message().await;
        if topic == "lw/v1/b1/elev-1/down/upload-grant" {
            match v1::Downlink::decode(payload.as_slice()).unwrap().body {
                Some(v1::downlink::Body::UploadGrant(grant)) => return grant,
                other => panic!("expected an upload grant, got {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_uploads_through_a_presigned_url_and_the_bus_carries_only_the_reference() {
    let (nats, pg) = servers().await;
    let s3 = S3::start().await.unwrap();
    let uploads = UploadsConfig {
        endpoint: s3.endpoint(),
        region: "us-east-1".into(),
        bucket: s3.bucket().into(),
        access_key: s3.access_key().into(),
        secret_key: s3.secret_key().into(),
        url_ttl: std::time::Duration::from_secs(300),
        max_bytes: 1024 * 1024,
    };
    let gw = Replica::start_with_config(&nats, &pg, "gw-1", move |config| {
        config.uploads = Some(uploads)
    })
    .await;
    let secret = provision(&gw, "b1", "elev-1", DeviceKind::Elevator).await;
    let mut device = Device::connect(gw.addr, "elev-1", "elev-1", &secret)
        .connected()
        .await;
    device.subscribe("lw/v1/b1/elev-1/down/+").await;

    let bundle = b"diagnostic bundle: door operator current trace ...".repeat(100);
    let digest = Sha256::digest(&bundle).to_vec();
    device
        .publish(
            "lw/v1/b1/elev-1/up/upload-request",
            upload_request(1, bundle.len() as u64, digest.clone()),
        )
        .await;
    let granted = grant(&mut device).await;
    assert_eq!(
        (granted.request_id.as_str(), granted.error.as_str()),
        ("r-1", "")
    );
    let target = granted.target.unwrap();
    assert_eq!(target.bucket, s3.bucket());
    assert_eq!(target.key, "uploads/b1/elev-1/1-diagnostics");
    assert_eq!(
        (target.size, target.sha256.clone()),
        (bundle.len() as u64, digest.clone())
    );
    let presigned = target.presigned.unwrap();
    assert_eq!(presigned.method, "PUT");

    assert_eq!(
        http_put(&presigned.url, "application/gzip", &bundle).await,
        200
    );
    let stored = s3
        .client()
        .get_object()
        .bucket(s3.bucket())
        .key(&target.key)
        .send()
        .await
        .unwrap();
    let stored = stored.body.collect().await.unwrap().into_bytes();
    assert_eq!(Sha256::digest(&stored).to_vec(), digest);
    // The URL is bound to the granted size: a larger body (or a smaller one) is refused.
    let mut larger = bundle.clone();
    larger.push(0);
    assert_eq!(
        http_put(&presigned.url, "application/gzip", &larger).await,
        403
    );
    assert_eq!(
        http_put(&presigned.url, "application/gzip", &bundle[..10]).await,
        403
    );
    // The URL is bound to its object: it cannot write another key.
    assert_eq!(
        http_put(
            &presigned.url.replace("1-diagnostics", "2-diagnostics"),
            "application/gzip",
            b"x"
        )
        .await,
        403
    );

    // Too large: refused with a reason.
    device
        .publish(
            "lw/v1/b1/elev-1/up/upload-request",
            upload_request(2, 10 * 1024 * 1024, digest.clone()),
        )
        .await;
    let refused = grant(&mut device).await;
    assert_eq!(
        (refused.error.as_str(), refused.target.is_none()),
        ("too_large", true)
    );
    // Not a content type a header can carry: refused as such, not "unavailable" (which a device
    // would retry).
    device
        .publish(
            "lw/v1/b1/elev-1/up/upload-request",
            upload_request_of(3, 10, digest.clone(), "text/plain\r\nX-Evil: 1"),
        )
        .await;
    let refused = grant(&mut device).await;
    assert_eq!(
        (refused.error.as_str(), refused.target.is_none()),
        ("bad_content_type", true)
    );
    gw.stop().await;
}
