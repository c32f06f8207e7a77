//! Task supervision: an ingress task that fails or panics is restarted with backoff, and the
//! agent goes on.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use fieldgate_firmware_bridge::transport::stopped;
use tokio::sync::watch;

/// Restarts of a supervised task, for `/metrics`.
#[derive(Debug, Default)]
pub struct Restarts(pub AtomicU64);

/// Runs `start()` until `stop` turns true; whenever the task it returns ends (with an error, a
/// panic, or even cleanly) before that, starts it again after a backoff that doubles from
/// `initial` to `max` and resets once a run has lasted longer than `max`.
pub async fn supervise<F, Fut, E>(
    name: &'static str,
    mut start: F,
    initial: Duration,
    max: Duration,
    restarts: Arc<Restarts>,
    stop: watch::Receiver<bool>,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let mut delay = initial;
    loop {
        if *stop.borrow() {
            return;
        }
        let started = tokio::time::Instant::now();
        let mut task = tokio::spawn(start());
        let outcome = tokio::select! {
            outcome = &mut task => outcome,
            _ = stopped(stop.clone()) => {
                // Give the task the chance to see the same stop signal and finish cleanly.
                let _ = tokio::time::timeout(Duration::from_secs(5), &mut task).await;
                task.abort();
                return;
            }
        };
        match outcome {
            Ok(Ok(())) => tracing::warn!(task = name, "task ended; restarting"),
            Ok(Err(err)) => tracing::error!(task = name, error = %err, "task failed; restarting"),
            Err(join) => tracing::error!(task = name, error = %join, "task panicked; restarting"),
        }
        restarts.0.fetch_add(1, Relaxed);
        if started.elapsed() > max {
            delay = initial;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(stop.clone()) => return,
        }
        delay = (delay * 2).min(max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_failing_and_panicking_task_is_restarted_until_stopped() {
        let (stop_tx, stop) = watch::channel(false);
        let restarts = Arc::new(Restarts::default());
        let runs = Arc::new(AtomicU64::new(0));
        let counted = runs.clone();
        let supervisor = tokio::spawn(supervise(
            "flaky",
            move || {
                let run = counted.fetch_add(1, Relaxed);
                async move {
                    match run {
                        0 => Err("first run fails".to_string()),
                        1 => panic!("second run panics"),
                        _ => {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            Ok(())
                        }
                    }
                }
            },
            Duration::from_millis(100),
            Duration::from_secs(5),
            restarts.clone(),
            stop,
        ));
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(runs.load(Relaxed), 3, "failed, panicked, then running");
        assert_eq!(restarts.0.load(Relaxed), 2);
        stop_tx.send(true).unwrap();
        supervisor.await.unwrap();
    }
}
