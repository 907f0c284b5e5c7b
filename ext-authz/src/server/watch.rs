//! Watches the policy path and calls back, debounced, after changes settle. A directory is
//! watched recursively (a Kubernetes ConfigMap swaps its `..data` symlink inside it); a single
//! file through its parent directory, since editors replace files by rename. File events can be
//! missed (the directory is replaced, did not exist at start, inotify limits), so the path is
//! also polled: every tick calls back too. A reload of unchanged files reads them and stops.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// Starts watching; `on_change` runs after each burst of changes once `debounce` passed without
/// another, and every `poll` (if any). Stops when `stopped` turns true. A watcher that cannot
/// start is logged; polling still runs.
pub fn spawn<F, Fut>(
    path: PathBuf,
    debounce: Duration,
    poll: Option<Duration>,
    on_change: F,
    mut stopped: watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    // One pending event is enough: a reload reads everything.
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let handler = move |event: notify::Result<notify::Event>| {
        if let Ok(e) = event {
            if !matches!(e.kind, notify::EventKind::Access(_)) {
                let _ = tx.try_send(());
            }
        }
    };
    let (target, mode) = if path.is_dir() {
        (path.clone(), RecursiveMode::Recursive)
    } else {
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), PathBuf::from);
        (parent, RecursiveMode::NonRecursive)
    };
    let watcher = notify::recommended_watcher(handler).and_then(|mut w| {
        w.watch(&target, mode)?;
        Ok(w)
    });
    let watcher = match watcher {
        Ok(w) => {
            tracing::info!(path = %target.display(), "watching policies for changes");
            Some(w)
        }
        Err(e) => {
            tracing::warn!(path = %target.display(), error = %e, "cannot watch policies: polling only");
            None
        }
    };
    tasks.spawn(async move {
        // The watcher lives as long as this task.
        let _watcher = watcher;
        let mut tick = poll.map(tokio::time::interval);
        loop {
            let polled = async {
                match tick.as_mut() {
                    Some(t) => {
                        t.tick().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                got = rx.recv() => {
                    if got.is_none() {
                        break;
                    }
                }
                () = polled => {
                    on_change().await;
                    continue;
                }
                _ = super::stopped_signal(&mut stopped) => break,
            }
            // Debounce: wait until changes stop for `debounce`.
            loop {
                tokio::select! {
                    got = tokio::time::timeout(debounce, rx.recv()) => {
                        match got {
                            Ok(Some(())) => continue,
                            _ => break,
                        }
                    }
                    _ = super::stopped_signal(&mut stopped) => return,
                }
            }
            on_change().await;
        }
    });
}
