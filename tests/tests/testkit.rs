//! The test kit's own promises: servers are isolated and leave nothing behind.

// Helpers outside #[test] functions panic on purpose: a failed setup fails the test.
#![allow(clippy::unwrap_used)]

use liftwire_testkit::{Nats, Postgres};

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
