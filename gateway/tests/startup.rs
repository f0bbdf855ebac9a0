//! The gateway declares the contract's streams and reports NATS readiness.

// Helpers outside #[test] functions panic on purpose: a failed setup fails the test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use liftwire_gateway::{Config, Gateway};
use liftwire_proto::naming::{DEAD_LETTER_STREAM, UPLINK_STREAM};
use liftwire_runtime::nats::NatsConfig;
use liftwire_runtime::service::{BuildContext, Service};
use liftwire_testkit::Nats;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread")]
async fn declares_streams_reports_ready_and_stops_on_shutdown() {
    let nats = Nats::start().expect("nats");
    let config = Config {
        nats: NatsConfig {
            url: nats.url(),
            ..Default::default()
        },
        readiness_interval: Duration::from_millis(20),
        ..Default::default()
    };
    let ctx = BuildContext::new();
    let gateway = Gateway::build(config, &ctx).await.expect("builds");
    assert_eq!(
        ctx.readiness.not_ready(),
        ["nats"],
        "not ready before running"
    );

    let js = async_nats::jetstream::new(nats.client().await.unwrap());
    for spec in [&UPLINK_STREAM, &DEAD_LETTER_STREAM] {
        let mut stream = js.get_stream(spec.name).await.expect("stream declared");
        let info = stream.info().await.unwrap();
        assert_eq!(info.config.subjects, spec.subjects);
        assert_eq!(
            info.config.storage,
            async_nats::jetstream::stream::StorageType::File
        );
    }

    let stop = CancellationToken::new();
    let run = tokio::spawn(gateway.run(stop.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !ctx.readiness.not_ready().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    run.await.unwrap().expect("clean stop");
    assert_eq!(
        ctx.readiness.not_ready(),
        ["nats"],
        "not ready once stopped"
    );
}
