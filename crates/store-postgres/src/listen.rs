//! The LISTEN task: changes made through any replica, turned into wake-ups for the Claims waiting
//! on this one.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use idempotency_core::domain::{Key, Namespace};
use idempotency_core::store::Wakeup;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

/// Keeps one connection LISTENing for key changes made through any replica, and forwards them as
/// wake-ups; after each (re)connect it wakes every waiter, since changes may have been missed.
pub(crate) async fn listen_task(
    config: tokio_postgres::Config,
    channel: String,
    wakeups: mpsc::UnboundedSender<Wakeup>,
    stop: CancellationToken,
    reconnects: Arc<AtomicU64>,
) {
    let mut connected_before = false;
    loop {
        let session = async {
            let (client, mut connection) = config.connect(NoTls).await?;
            let (messages_tx, mut messages) = mpsc::unbounded_channel();
            let pump = tokio::spawn(async move {
                while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    match message {
                        Ok(AsyncMessage::Notification(notification)) => {
                            let _ = messages_tx.send(notification.payload().to_owned());
                        }
                        Ok(_) => {}
                        Err(error) => {
                            tracing::warn!(%error, "the LISTEN connection failed");
                            break;
                        }
                    }
                }
            });
            client.batch_execute(&format!("LISTEN \"{channel}\"")).await?;
            if connected_before {
                reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::info!("LISTEN connection re-established");
            }
            let _ = wakeups.send(Wakeup::All);
            connected_before = true;
            while let Some(payload) = messages.recv().await {
                if let Some(wakeup) = parse_payload(&payload) {
                    let _ = wakeups.send(wakeup);
                }
            }
            pump.abort();
            drop(client);
            Ok::<(), tokio_postgres::Error>(())
        };
        tokio::select! {
            () = stop.cancelled() => return,
            result = session => {
                if let Err(error) = result {
                    tracing::debug!(%error, "cannot LISTEN; retrying");
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Reads `<namespace length>:<namespace><key>`, as `notify_waiters` writes it.
pub(crate) fn parse_payload(payload: &str) -> Option<Wakeup> {
    let (length, rest) = payload.split_once(':')?;
    let length: usize = length.parse().ok()?;
    let namespace = Namespace::parse(rest.get(..length)?).ok()?;
    let key = Key::parse(rest.get(length..)?).ok()?;
    Some(Wakeup::Key(namespace, key))
}
