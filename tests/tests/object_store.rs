//! Objects through a real S3-compatible server with `aws-sdk-s3`: the server checks signatures,
//! and presigned URLs work for a client that holds no credentials (an in-cabin screen).

// Helpers outside #[test] functions panic on purpose: a failed setup fails the test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use liftwire_testkit::S3;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A bare HTTP/1.1 GET, so the test proves the presigned URL alone grants access.
async fn http_get(url: &str) -> (u16, Vec<u8>) {
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest.split_at(rest.find('/').expect("path"));
    let mut stream = tokio::net::TcpStream::connect(host).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers end");
    let status = std::str::from_utf8(&response[9..12])
        .unwrap()
        .parse()
        .unwrap();
    (status, response[split + 4..].to_vec())
}

#[tokio::test]
async fn put_get_and_presigned_get() {
    let s3 = S3::start().await.expect("s3s-fs starts");
    let client = s3.client();
    let body = b"%PDF-1.7 monthly report of building mc-larvotto".to_vec();
    let digest = Sha256::digest(&body);

    client
        .put_object()
        .bucket(s3.bucket())
        .key("reports/mc-larvotto/2026-10.pdf")
        .content_type("application/pdf")
        .body(ByteStream::from(body.clone()))
        .send()
        .await
        .expect("put");

    let got = client
        .get_object()
        .bucket(s3.bucket())
        .key("reports/mc-larvotto/2026-10.pdf")
        .send()
        .await
        .expect("get");
    assert_eq!(got.content_length(), Some(body.len() as i64));
    let bytes = got.body.collect().await.unwrap().into_bytes();
    assert_eq!(Sha256::digest(&bytes), digest);

    let presigned = client
        .get_object()
        .bucket(s3.bucket())
        .key("reports/mc-larvotto/2026-10.pdf")
        .presigned(PresigningConfig::expires_in(Duration::from_secs(300)).unwrap())
        .await
        .expect("presign");
    let (status, fetched) = http_get(presigned.uri()).await;
    assert_eq!(status, 200);
    assert_eq!(fetched, body);

    // Tampering with the signed URL must be refused: the server really checks signatures.
    let tampered = presigned.uri().replace("2026-10.pdf", "2026-09.pdf");
    assert_eq!(http_get(&tampered).await.0, 403);
}

#[tokio::test]
async fn wrong_secret_is_refused() {
    let s3 = S3::start().await.expect("s3s-fs starts");
    let err = s3
        .client_with_secret("not-the-secret")
        .list_objects_v2()
        .bucket(s3.bucket())
        .send()
        .await
        .expect_err("bad signature refused");
    let status = err.raw_response().map(|r| r.status().as_u16());
    assert_eq!(status, Some(403), "{err:?}");
}
