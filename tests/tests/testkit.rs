//! The test kit's own promises: servers are isolated and leave nothing behind.

// Helpers outside #[test] functions panic on purpose: a failed setup fails the test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use liftwire_testkit::{process, Nats, Postgres};

#[tokio::test]
async fn postgres_fixture_is_private_and_survives_restart() {
    let mut a = Postgres::start().await.expect("postgres starts");
    let b = Postgres::start().await.expect("a second one starts");
    assert_ne!(a.port(), b.port());

    let pool = a.pool().await.unwrap();
    sqlx::query("CREATE TABLE t (v int)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO t VALUES (42)")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    // The other fixture does not see it.
    let other = b.pool().await.unwrap();
    assert!(sqlx::query("SELECT v FROM t")
        .fetch_one(&other)
        .await
        .is_err());

    a.restart().expect("restart");
    let pool = a.pool().await.unwrap();
    let v: i32 = sqlx::query_scalar("SELECT v FROM t")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(v, 42);
}

#[tokio::test]
async fn dropping_a_fixture_stops_the_server() {
    let nats = Nats::start().expect("nats-server starts");
    let addr = format!("127.0.0.1:{}", nats.port());
    assert!(std::net::TcpStream::connect(&addr).is_ok());
    drop(nats);
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "server still listening after drop"
    );
}

#[test]
fn free_ports_are_never_handed_out_twice() {
    // The kernel hands a released port out again (about 40 times in 1,000 binds here): a
    // server stopped for a restart would lose its port to another test's server.
    let ports: Vec<u16> = (0..1000)
        .map(|_| process::free_port().expect("a free port"))
        .collect();
    let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
    assert_eq!(distinct.len(), ports.len());
}

#[test]
fn a_port_another_process_listens_on_is_not_the_servers() {
    // The test process holds the port; the "server" never listens.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("30");
    let mut server =
        process::ServerProcess::spawn(cmd, &dir.path().join("log"), None, libc::SIGTERM).unwrap();
    let waited = process::wait_for_port("sleep", &mut server, addr, Duration::from_millis(500));
    assert!(
        matches!(waited, Err(liftwire_testkit::Error::NotReady { .. })),
        "{waited:?}"
    );
}
