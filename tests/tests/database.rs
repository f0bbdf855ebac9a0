//! The services' shared PostgreSQL settings against a real PostgreSQL.

// Helpers outside #[test] functions panic on purpose: a failed setup fails the test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use liftwire_runtime::database::DatabaseConfig;
use liftwire_testkit::Postgres;

#[tokio::test]
async fn a_statement_running_past_the_timeout_is_cancelled_with_an_error() {
    let pg = Postgres::start().await.expect("postgres starts");
    let pool = DatabaseConfig {
        url: pg.url(),
        statement_timeout: Duration::from_millis(200),
        ..Default::default()
    }
    .pool()
    .unwrap();
    // A statement stuck for longer (here asleep; in production, waiting on a lock).
    let stuck = sqlx::query("SELECT pg_sleep(5)").execute(&pool).await;
    let Err(sqlx::Error::Database(e)) = stuck else {
        panic!("cancelled with a database error: {stuck:?}")
    };
    assert_eq!(e.code().as_deref(), Some("57014"), "query_canceled: {e}");
    // The connection is fine for the next statement.
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(one, 1);
    pool.close().await;
}

#[test]
fn a_statement_timeout_postgresql_cannot_take_is_refused() {
    for timeout in [
        Duration::from_micros(500),
        Duration::from_secs(30 * 24 * 3600),
    ] {
        let config = DatabaseConfig {
            statement_timeout: timeout,
            ..Default::default()
        };
        assert!(
            matches!(config.pool(), Err(sqlx::Error::Configuration(_))),
            "{timeout:?}"
        );
    }
}
