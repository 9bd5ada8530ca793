//! Connections to PostgreSQL: opening one (the driver's connection task, notifications handed
//! to the caller), what a driver error means for the daemon (unreachable, login refused, TLS,
//! a missing privilege, or a statement's own error), and `Link`, the shared connection the
//! daemon's statements run on, opened again after it is lost.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, Notification};

use super::target::Target;
use crate::queue::QueueError;

/// Longest a statement may take before the connection is taken for lost: a network cut
/// otherwise leaves it waiting until the kernel gives up.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest a connection may take to be ready for statements (TCP, TLS, login).
const CONNECT_DEADLINE: Duration = Duration::from_secs(30);

/// Opens a connection and starts its driver task, which hands every notification to
/// `on_note` and ends when the connection does.
pub(super) async fn connect(
    target: &Target,
    mut on_note: impl FnMut(Notification) + Send + 'static,
) -> Result<(Client, tokio::task::JoinHandle<()>), QueueError> {
    let location = target.display();
    let setup = |problem: String| QueueError::Setup {
        location: location.clone(),
        problem,
    };
    let config = target.pg_config().map_err(setup)?;
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(target.tls().map_err(setup)?);
    // The driver's connect_timeout covers the TCP connect only; TLS and the login (a pooler
    // with no free server connection) are bounded here.
    let deadline = CONNECT_DEADLINE.max(target.connect_timeout + Duration::from_secs(20));
    let (client, mut conn) = tokio::time::timeout(deadline, config.connect(tls))
        .await
        .map_err(|_| QueueError::Unreachable {
            location: location.clone(),
            source: format!("no session within {deadline:?}").into(),
        })?
        .map_err(|e| classify(target, "connect", e))?;
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => on_note(n),
                Some(Ok(AsyncMessage::Notice(n))) => {
                    tracing::debug!(database = %location, notice = %n.message(), "queue database notice")
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(database = %location, error = %e, "queue database connection lost");
                    break;
                }
                None => break,
            }
        }
    });
    Ok((client, driver))
}

/// What a driver error means. `what` says what the statement was for.
pub(super) fn classify(target: &Target, what: &str, e: tokio_postgres::Error) -> QueueError {
    let location = target.display();
    // The driver's own text is often only "db error" or "error connecting to server", with
    // the reason in its sources.
    let text = chain(&e);
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        if *code == SqlState::INVALID_PASSWORD
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        {
            return QueueError::Login {
                location,
                source: text.clone().into(),
            };
        }
        if *code == SqlState::INSUFFICIENT_PRIVILEGE {
            return QueueError::Privilege {
                location,
                what: what.to_owned(),
                source: text.clone().into(),
            };
        }
        if *code == SqlState::INVALID_CATALOG_NAME {
            return QueueError::Setup {
                location,
                problem: db.message().to_owned(),
            };
        }
        // Connection exceptions, a server shutting down or starting, too many connections, a
        // server that is read-only (a standby after a failover: the connection is dropped, so
        // that the next one finds the new primary): the database is away for now, which is
        // never a row's fault.
        let c = code.code();
        if c.starts_with("08")
            || c.starts_with("57P")
            || *code == SqlState::TOO_MANY_CONNECTIONS
            || *code == SqlState::CANNOT_CONNECT_NOW
            || *code == SqlState::READ_ONLY_SQL_TRANSACTION
        {
            return QueueError::Unreachable {
                location,
                source: text.clone().into(),
            };
        }
        // Refused for now: a deadlock or serialization failure, a lock not to be had, a
        // statement cancelled (statement_timeout, pg_cancel_backend), resources short.
        if *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED
            || c.starts_with("53")
            || *code == SqlState::LOCK_NOT_AVAILABLE
            || *code == SqlState::QUERY_CANCELED
        {
            return QueueError::Transient {
                what: what.to_owned(),
                source: text.clone().into(),
            };
        }
        return QueueError::Query {
            what: what.to_owned(),
            source: text.clone().into(),
        };
    }
    if is_tls(&e) {
        return QueueError::Tls {
            location,
            source: text.clone().into(),
        };
    }
    if text.starts_with("authentication error") || text.contains("password missing") {
        return QueueError::Login {
            location,
            source: text.into(),
        };
    }
    if text.starts_with("invalid configuration") {
        return QueueError::Setup {
            location,
            problem: text,
        };
    }
    // Everything else that is not the database's own answer is the connection: closed,
    // refused, timed out, reset.
    if e.is_closed() || e.code().is_none() && !is_statement_error(&text) {
        return QueueError::Unreachable {
            location,
            source: text.clone().into(),
        };
    }
    QueueError::Query {
        what: what.to_owned(),
        source: text.clone().into(),
    }
}

/// The error and its sources in one line: the driver's own text is often only "invalid
/// configuration", with the reason in its source.
fn chain(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// Errors the driver raises about a statement itself (a bad parameter, a column of another
/// type), which reconnecting would not change.
fn is_statement_error(text: &str) -> bool {
    [
        "error serializing",
        "error deserializing",
        "invalid column",
        "expected ",
        "query returned an unexpected number of rows",
    ]
    .iter()
    .any(|p| text.starts_with(p))
}

fn is_tls(e: &tokio_postgres::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return true;
        }
        source = s.source();
    }
    e.to_string().contains("TLS")
}

/// The daemon's statement connection, shared by every task (tokio-postgres pipelines their
/// statements on it), and opened again at the next statement once it is lost. Holds no
/// backoff of its own: its callers (the scheduler's loop, the heartbeat, a finish waiting for
/// the database) pace their retries.
pub(super) struct Link {
    target: Arc<Target>,
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
}

impl Link {
    pub(super) fn new(target: Arc<Target>) -> Link {
        Link {
            target,
            client: tokio::sync::Mutex::new(None),
        }
    }

    async fn client(&self) -> Result<Arc<Client>, QueueError> {
        let mut held = self.client.lock().await;
        if let Some(c) = held.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        *held = None;
        let (client, _driver) = connect(&self.target, |_| {}).await?;
        let client = Arc::new(client);
        *held = Some(client.clone());
        Ok(client)
    }

    /// Drops the connection if it is still `client`, so that the next statement opens a new one.
    async fn lost(&self, client: &Arc<Client>) {
        let mut held = self.client.lock().await;
        if held.as_ref().is_some_and(|c| Arc::ptr_eq(c, client)) {
            *held = None;
        }
    }

    /// Runs one statement (or a few, in one call) on the connection, opened if need be.
    pub(super) async fn run<T, F, Fut>(&self, what: &str, f: F) -> Result<T, QueueError>
    where
        F: FnOnce(Arc<Client>) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let client = self.client().await?;
        match tokio::time::timeout(STATEMENT_TIMEOUT, f(client.clone())).await {
            Ok(Ok(t)) => Ok(t),
            Ok(Err(e)) => {
                let e = classify(&self.target, what, e);
                if e.is_unreachable() || client.is_closed() {
                    self.lost(&client).await;
                }
                Err(e)
            }
            Err(_) => {
                self.lost(&client).await;
                Err(QueueError::Unreachable {
                    location: self.target.display(),
                    source: format!("{what}: no answer within {STATEMENT_TIMEOUT:?}").into(),
                })
            }
        }
    }
}
