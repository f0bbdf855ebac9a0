//! Graceful shutdown: on SIGTERM or SIGINT, cancel a token that every task watches, then give the
//! work a bounded grace period to drain. A second signal, or the end of the grace period, stops
//! waiting.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How a supervised run ended badly.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError<E> {
    /// The work failed on its own.
    #[error(transparent)]
    Failed(E),
    /// The work did not finish within the grace period after the shutdown signal.
    #[error("work still running {0:?} after the shutdown signal; giving up")]
    GraceExceeded(Duration),
    /// A second signal arrived while draining.
    #[error("second shutdown signal while draining; giving up")]
    Forced,
}

/// Resolves on the first SIGTERM or SIGINT (Ctrl-C), naming it.
pub async fn signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            },
            _ => ctrl_c().await,
        }
    }
    #[cfg(not(unix))]
    {
        ctrl_c().await
    }
}

async fn ctrl_c() -> &'static str {
    match tokio::signal::ctrl_c().await {
        Ok(()) => "Ctrl-C",
        // No way to receive signals: only an external kill can stop the process.
        Err(_) => std::future::pending().await,
    }
}

/// Runs `work(token)`; when `signals` yields a first signal, cancels `token` and waits at most
/// `grace` for `work` to finish; a second signal stops waiting at once.
///
/// `signals` is a factory so tests can inject their own signal source: it is called once per
/// expected signal.
pub async fn supervise<W, F, E, S, SF>(
    grace: Duration,
    mut signals: S,
    work: W,
) -> Result<(), ShutdownError<E>>
where
    W: FnOnce(CancellationToken) -> F,
    F: Future<Output = Result<(), E>>,
    S: FnMut() -> SF,
    SF: Future<Output = &'static str>,
{
    let token = CancellationToken::new();
    let work = work(token.clone());
    tokio::pin!(work);
    tokio::select! {
        result = &mut work => return result.map_err(ShutdownError::Failed),
        name = signals() => {
            tracing::info!(signal = name, grace = ?grace, "shutting down: draining in-flight work");
            token.cancel();
        }
    }
    tokio::select! {
        result = &mut work => result.map_err(ShutdownError::Failed),
        _ = tokio::time::sleep(grace) => Err(ShutdownError::GraceExceeded(grace)),
        _ = signals() => Err(ShutdownError::Forced),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::sync::Notify;

    type SignalFuture = std::pin::Pin<Box<dyn Future<Output = &'static str> + Send>>;

    /// A signal source the test fires by hand.
    fn manual() -> (Arc<Notify>, impl FnMut() -> SignalFuture) {
        let notify = Arc::new(Notify::new());
        let n = notify.clone();
        (notify, move || {
            let n = n.clone();
            Box::pin(async move {
                n.notified().await;
                "TEST"
            })
        })
    }

    #[tokio::test(start_paused = true)]
    async fn drains_within_grace() {
        let (fire, signals) = manual();
        let drained = Arc::new(AtomicUsize::new(0));
        let d = drained.clone();
        let run = tokio::spawn(supervise(
            Duration::from_secs(10),
            signals,
            move |token| async move {
                token.cancelled().await;
                tokio::time::sleep(Duration::from_secs(3)).await;
                d.fetch_add(1, Ordering::SeqCst);
                Ok::<(), std::io::Error>(())
            },
        ));
        tokio::task::yield_now().await;
        fire.notify_one();
        run.await.unwrap().unwrap();
        assert_eq!(drained.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_grace() {
        let (fire, signals) = manual();
        let run = tokio::spawn(supervise(
            Duration::from_secs(2),
            signals,
            |token| async move {
                token.cancelled().await;
                std::future::pending::<()>().await;
                Ok::<(), std::io::Error>(())
            },
        ));
        tokio::task::yield_now().await;
        fire.notify_one();
        let started = tokio::time::Instant::now();
        let err = run.await.unwrap().unwrap_err();
        assert!(matches!(err, ShutdownError::GraceExceeded(_)));
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn second_signal_forces_exit() {
        let (fire, signals) = manual();
        let run = tokio::spawn(supervise(
            Duration::from_secs(60),
            signals,
            |token| async move {
                token.cancelled().await;
                std::future::pending::<()>().await;
                Ok::<(), std::io::Error>(())
            },
        ));
        tokio::task::yield_now().await;
        fire.notify_one();
        tokio::time::sleep(Duration::from_secs(1)).await;
        fire.notify_one();
        assert!(matches!(
            run.await.unwrap().unwrap_err(),
            ShutdownError::Forced
        ));
    }

    #[tokio::test]
    async fn work_errors_pass_through() {
        let (_fire, signals) = manual();
        let err = supervise(Duration::from_secs(1), signals, |_| async {
            Err::<(), _>(std::io::Error::other("boom"))
        })
        .await
        .unwrap_err();
        assert!(matches!(err, ShutdownError::Failed(e) if e.to_string() == "boom"));
    }
}
