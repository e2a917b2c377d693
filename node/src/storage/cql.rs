//! The CQL storage backend (ScyllaDB, Apache Cassandra), on the scylla driver.
//!
//! Every [`Table`] is one CQL table `(pk blob, ck blob, v blob, PRIMARY KEY
//! ((pk), ck))` in one keyspace, so a storage partition is a CQL partition
//! and a scan is a clustering-range slice of it. The schema, the queries and
//! each table's expected size are described in `docs/storage-cql.md`.
//!
//! The driver is tokio-only; the [`Store`] trait is synchronous and called
//! from glommio shard threads. Each call therefore builds an owned future and
//! runs it on the backend's own [`SideRuntime`] (a bounded queue in, a
//! one-slot channel out), blocking the calling shard for one round trip.
//!
//! Requests:
//! - statements are prepared once per table and kind, lazily, and cached;
//! - reads and plain writes use the configured consistency (LOCAL_QUORUM by
//!   default); [`Store::insert_if_absent`] is `INSERT ... IF NOT EXISTS`
//!   (a lightweight transaction) at LOCAL_SERIAL;
//! - [`Store::write`] is one LOGGED batch (one statement when it holds one
//!   write) with a client timestamp chosen once, so a retry after a timeout
//!   re-applies the same cells and can never overwrite a later write; only
//!   the last write to each row is sent, because writes sharing a timestamp
//!   would otherwise resolve by CQL's tie rule, not by batch order;
//! - reads and writes are retried `retries` times on timeouts and
//!   unavailable replicas; conditional inserts are not (a retry could see its
//!   own first attempt as "someone else's row").
//!
//! **Invariant**: connectivity problems (no connection, timeouts, too few
//! replicas) surface as [`StorageError::Unavailable`], which the API edge
//! answers with 503; no partial state is ever reported as success.

use std::collections::HashMap;
use std::ops::{Bound, ControlFlow};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::{DbError, ExecutionError, PrepareError, RequestAttemptError};
use scylla::policies::retry::DefaultRetryPolicy;
use scylla::policies::timestamp_generator::{MonotonicTimestampGenerator, TimestampGenerator};
use scylla::response::PagingState;
use scylla::response::query_result::QueryResult;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency, Statement};
use scylla::value::{CqlValue, Row as CqlRow};
use tokio::sync::OnceCell;

use super::{Row, Scan, StorageError, StorageResult, Store, Table, Write};
use crate::config::Scylla as CqlConfig;
use crate::side::{BridgeError, SideRuntime};

/// Versioned schema changes, applied in order once each and recorded in
/// `schema_migrations`. Every statement must be idempotent (a crash between
/// a statement and its record re-runs it). `{ks}` is the keyspace.
///
/// The per-table tables are not listed here: every table of [`Table::ALL`]
/// has the same shape, so a missing one is created on start (see
/// [`migrate`]); a new `Table` needs no migration, a changed shape does.
const MIGRATIONS: &[(i32, &str, &[&str])] = &[(1, "baseline: one (pk, ck, v) table per storage table", &[])];

/// Statement kinds prepared per table: get, put, delete, conditional insert,
/// range delete, then 18 scans (3 lower bounds x 3 upper bounds x 2 orders).
const KIND_GET: usize = 0;
const KIND_PUT: usize = 1;
const KIND_DELETE: usize = 2;
const KIND_LWT: usize = 3;
const KIND_DELETE_RANGE: usize = 4;
const KIND_SCAN: usize = 5;
const KINDS: usize = KIND_SCAN + 18;

/// Longest start-up (connection and migrations) before giving up.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(180);

/// Timeout of one schema change (CREATE KEYSPACE / TABLE, migrations).
const DDL_TIMEOUT: Duration = Duration::from_secs(60);

/// Rows per page of a scan response.
const SCAN_PAGE_ROWS: i32 = 1000;

/// First delay between retries; doubled for each further retry.
const RETRY_BACKOFF: Duration = Duration::from_millis(50);

/// Parses a consistency name as written in the configuration.
pub fn parse_consistency(name: &str) -> Option<Consistency> {
    Some(match name {
        "local_quorum" => Consistency::LocalQuorum,
        "quorum" => Consistency::Quorum,
        "one" => Consistency::One,
        "local_one" => Consistency::LocalOne,
        "two" => Consistency::Two,
        "three" => Consistency::Three,
        "all" => Consistency::All,
        "each_quorum" => Consistency::EachQuorum,
        _ => return None,
    })
}

/// Parses a serial consistency name as written in the configuration.
pub fn parse_serial_consistency(name: &str) -> Option<SerialConsistency> {
    Some(match name {
        "local_serial" => SerialConsistency::LocalSerial,
        "serial" => SerialConsistency::Serial,
        _ => return None,
    })
}

/// The CQL backend; see the module docs.
pub struct Cql {
    inner: Arc<Inner>,
    // Declared last: dropped after `inner`'s last use on this side, and its
    // Drop stops the runtime that owns the driver's connections.
    side: SideRuntime,
}

struct Inner {
    session: Session,
    tables: HashMap<Table, TableStatements>,
    timestamps: MonotonicTimestampGenerator,
    retries: u32,
}

struct TableStatements {
    /// `keyspace.table`.
    name: String,
    prepared: [OnceCell<PreparedStatement>; KINDS],
}

fn unavailable(e: impl std::fmt::Display) -> StorageError {
    StorageError::Unavailable(e.to_string())
}

fn engine(e: impl std::fmt::Display) -> StorageError {
    StorageError::Engine(e.to_string())
}

impl From<BridgeError> for StorageError {
    fn from(e: BridgeError) -> Self {
        match e {
            BridgeError::Start(_) => engine(e),
            _ => unavailable(format!("CQL backend: {e}")),
        }
    }
}

/// Whether an attempt failed for reasons that may pass: the request may be
/// retried, and the client is told the service is unavailable.
fn attempt_is_transient(e: &RequestAttemptError) -> bool {
    match e {
        RequestAttemptError::UnableToAllocStreamId | RequestAttemptError::BrokenConnectionError(_) => true,
        RequestAttemptError::DbError(db, _) => matches!(
            db,
            DbError::Unavailable { .. }
                | DbError::Overloaded
                | DbError::IsBootstrapping
                | DbError::ReadTimeout { .. }
                | DbError::WriteTimeout { .. }
                | DbError::ReadFailure { .. }
                | DbError::WriteFailure { .. }
                | DbError::RateLimitReached { .. }
                | DbError::TruncateError
        ),
        _ => false,
    }
}

fn is_transient(e: &ExecutionError) -> bool {
    match e {
        ExecutionError::ConnectionPoolError(_) | ExecutionError::RequestTimeout(_) | ExecutionError::EmptyPlan => true,
        ExecutionError::LastAttemptError(a) => attempt_is_transient(a),
        ExecutionError::PrepareError(p) => prepare_is_transient(p),
        _ => false,
    }
}

fn prepare_is_transient(e: &PrepareError) -> bool {
    match e {
        PrepareError::ConnectionPoolError(_) => true,
        PrepareError::AllAttemptsFailed { first_attempt } => attempt_is_transient(first_attempt),
        _ => false,
    }
}

fn execution_error(e: ExecutionError) -> StorageError {
    if is_transient(&e) { unavailable(format!("CQL: {e}")) } else { engine(format!("CQL: {e}")) }
}

fn prepare_error(e: PrepareError) -> StorageError {
    if prepare_is_transient(&e) { unavailable(format!("CQL prepare: {e}")) } else { engine(format!("CQL prepare: {e}")) }
}

/// The kind index of a scan with these bounds and order.
fn scan_kind(from: Bound<()>, to: Bound<()>, reverse: bool) -> usize {
    let bound = |b: Bound<()>| match b {
        Bound::Unbounded => 0,
        Bound::Included(()) => 1,
        Bound::Excluded(()) => 2,
    };
    KIND_SCAN + (bound(from) * 3 + bound(to)) * 2 + usize::from(reverse)
}

/// The CQL text of statement `kind` on table `t` (`keyspace.table`).
fn statement_text(t: &str, kind: usize) -> String {
    match kind {
        KIND_GET => format!("SELECT v FROM {t} WHERE pk = ? AND ck = ?"),
        KIND_PUT => format!("INSERT INTO {t} (pk, ck, v) VALUES (?, ?, ?)"),
        KIND_DELETE => format!("DELETE FROM {t} WHERE pk = ? AND ck = ?"),
        KIND_LWT => format!("INSERT INTO {t} (pk, ck, v) VALUES (?, ?, ?) IF NOT EXISTS"),
        KIND_DELETE_RANGE => format!("DELETE FROM {t} WHERE pk = ? AND ck >= ? AND ck <= ?"),
        _ => {
            let scan = kind - KIND_SCAN;
            let (bounds, reverse) = (scan / 2, scan % 2 == 1);
            let mut q = format!("SELECT ck, v FROM {t} WHERE pk = ?");
            q.push_str(["", " AND ck >= ?", " AND ck > ?"][bounds / 3]);
            q.push_str(["", " AND ck <= ?", " AND ck < ?"][bounds % 3]);
            if reverse {
                q.push_str(" ORDER BY ck DESC");
            }
            q.push_str(" LIMIT ?");
            q
        }
    }
}

/// Creates the keyspace, the migrations table and every missing storage
/// table, sets the configured row expiries (`ttls`: table and
/// `default_time_to_live` in seconds), then applies pending [`MIGRATIONS`].
/// Idempotent; refuses a database whose schema is newer than this binary.
async fn migrate(session: &Session, keyspace: &str, replication: &str, ttls: &[(Table, i32)]) -> StorageResult<()> {
    // The session does not wait for schema agreement after each statement
    // (that costs a polling round per table); we wait once per step instead.
    // Schema changes queue behind each other on the server (one at a time),
    // so each gets a longer timeout than a request; the whole start-up is
    // bounded by MIGRATE_TIMEOUT.
    let ddl = |q: String| async move {
        let mut statement = Statement::new(q);
        statement.set_request_timeout(Some(DDL_TIMEOUT));
        session.query_unpaged(statement, &[]).await.map(|_| ()).map_err(execution_error)
    };
    let agree = || async { session.await_schema_agreement().await.map(|_| ()).map_err(|e| unavailable(format!("CQL schema agreement: {e}"))) };
    ddl(format!("CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {replication}")).await?;
    agree().await?;
    ddl(format!("CREATE TABLE IF NOT EXISTS {keyspace}.schema_migrations (version int PRIMARY KEY, description text, applied_at timestamp)")).await?;

    let existing = session
        .query_unpaged("SELECT table_name, default_time_to_live FROM system_schema.tables WHERE keyspace_name = ?", (keyspace,))
        .await
        .map_err(execution_error)?
        .into_rows_result()
        .map_err(engine)?
        .rows::<(String, i32)>()
        .map_err(engine)?
        .collect::<Result<HashMap<String, i32>, _>>()
        .map_err(engine)?;
    let missing: Vec<Table> = Table::ALL.into_iter().filter(|t| !existing.contains_key(t.name())).collect();
    let missing_was_empty = missing.is_empty();
    if !missing_was_empty {
        tracing::info!(keyspace, count = missing.len(), "creating CQL tables");
    }
    let ttl_of = |table: Table| ttls.iter().find(|(t, _)| *t == table).map_or(0, |&(_, ttl)| ttl);
    for table in missing {
        let name = table.name();
        let ttl = ttl_of(table);
        ddl(format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.{name} (pk blob, ck blob, v blob, PRIMARY KEY ((pk), ck)) WITH CLUSTERING ORDER BY (ck ASC) AND default_time_to_live = {ttl}"
        ))
        .await?;
    }
    // Expiring rows bound partitions that would otherwise only grow; the
    // setting follows the configuration on every start.
    let mut altered = false;
    for &(table, ttl) in ttls {
        if existing.get(table.name()).is_some_and(|&current| current != ttl) {
            tracing::info!(table = table.name(), ttl, "setting CQL default_time_to_live");
            ddl(format!("ALTER TABLE {keyspace}.{} WITH default_time_to_live = {ttl}", table.name())).await?;
            altered = true;
        }
    }
    if altered || !missing_was_empty {
        agree().await?;
    }

    let applied = session
        .query_unpaged(format!("SELECT version FROM {keyspace}.schema_migrations"), &[])
        .await
        .map_err(execution_error)?
        .into_rows_result()
        .map_err(engine)?
        .rows::<(i32,)>()
        .map_err(engine)?
        .map(|r| r.map(|(v,)| v))
        .collect::<Result<std::collections::BTreeSet<_>, _>>()
        .map_err(engine)?;
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if let Some(&newest) = applied.last()
        && newest > known
    {
        return Err(engine(format!("keyspace {keyspace} has schema version {newest}, newer than this binary's {known}; upgrade tessera-node")));
    }
    for &(version, description, statements) in MIGRATIONS {
        if applied.contains(&version) {
            continue;
        }
        tracing::info!(version, description, "applying CQL migration");
        for s in statements {
            ddl(s.replace("{ks}", keyspace)).await?;
        }
        agree().await?;
        session
            .query_unpaged(
                format!("INSERT INTO {keyspace}.schema_migrations (version, description, applied_at) VALUES (?, ?, toTimestamp(now()))"),
                (version, description),
            )
            .await
            .map_err(execution_error)?;
    }
    Ok(())
}

impl Cql {
    /// Connects to the cluster and applies the schema migrations. An
    /// unreachable cluster gives [`StorageError::Unavailable`] within about
    /// `connect_timeout_ms`.
    pub fn connect(config: &CqlConfig) -> StorageResult<Self> {
        let consistency = parse_consistency(&config.consistency).ok_or_else(|| engine(format!("unknown consistency {:?}", config.consistency)))?;
        let serial = parse_serial_consistency(&config.serial_consistency)
            .ok_or_else(|| engine(format!("unknown serial consistency {:?}", config.serial_consistency)))?;
        let request_timeout = Duration::from_millis(config.request_timeout_ms);
        let connect_timeout = Duration::from_millis(config.connect_timeout_ms);
        // A call may take every retry, each with its timeout and backoff;
        // connecting (with migrations) is bounded separately below.
        let retry_time: Duration = (0..config.retries).map(|n| request_timeout + RETRY_BACKOFF * 2u32.saturating_pow(n)).sum();
        let call_timeout = request_timeout + retry_time + Duration::from_millis(250);
        let side = SideRuntime::start("tessera-cql", config.runtime_threads, config.queue_depth, call_timeout)?;

        let profile = ExecutionProfile::builder()
            .consistency(consistency)
            .serial_consistency(Some(serial))
            .request_timeout(Some(request_timeout))
            .retry_policy(Arc::new(DefaultRetryPolicy::new()))
            .build()
            .into_handle();
        let mut builder = SessionBuilder::new()
            .known_nodes(&config.contact_points)
            .connection_timeout(connect_timeout)
            .auto_await_schema_agreement(false)
            .hostname_resolution_timeout(Some(connect_timeout))
            .default_execution_profile_handle(profile);
        if let (Some(user), Some(password)) = (&config.username, &config.password) {
            builder = builder.user(user, &password.0);
        }
        if let Some(tls) = tls_config(config)? {
            builder = builder.tls_context(Some(tls));
        }
        let (keyspace, replication) = (config.keyspace.clone(), config.replication.clone());
        let ttl = |secs: u32| i32::try_from(secs).map_err(|_| engine(format!("TTL {secs} s is out of range")));
        let ttls = [(Table::Transactions, ttl(config.transaction_ttl_secs)?), (Table::ClaimedKeys, ttl(config.claimed_key_ttl_secs)?)];
        let points = config.contact_points.join(", ");
        let connect = async move {
            // Discovery may take a few round trips after the first connection.
            let wait = connect_timeout * 2;
            let session = tokio::time::timeout(wait, builder.build())
                .await
                .map_err(|_| unavailable(format!("no answer from the CQL database at {points} within {wait:?}")))?
                .map_err(|e| unavailable(format!("cannot connect to the CQL database at {points}: {e}")))?;
            migrate(&session, &keyspace, &replication, &ttls).await?;
            Ok::<_, StorageError>(session)
        };
        // Creating tables waits for schema agreement each time: on a fresh
        // cluster that takes far longer than one request, so it has its own bound.
        let session = side.call_with_timeout(connect, MIGRATE_TIMEOUT).map_err(|e| match e {
            BridgeError::Timeout(_) => unavailable(format!("connecting and migrating the CQL schema took over {MIGRATE_TIMEOUT:?}")),
            e => e.into(),
        })??;

        let tables = Table::ALL
            .into_iter()
            .map(|t| (t, TableStatements { name: format!("{}.{}", config.keyspace, t.name()), prepared: std::array::from_fn(|_| OnceCell::new()) }))
            .collect();
        let inner = Inner { session, tables, timestamps: MonotonicTimestampGenerator::new(), retries: config.retries };
        Ok(Cql { inner: Arc::new(inner), side })
    }

    /// Runs `op` on the side runtime and waits for its result.
    fn run<T, F, Fut>(&self, op: F) -> StorageResult<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>) -> Fut,
        Fut: Future<Output = StorageResult<T>> + Send + 'static,
    {
        self.side.call(op(self.inner.clone()))?
    }
}

#[cfg(test)]
impl Cql {
    /// Runs one unprepared statement (test set-up and clean-up).
    fn raw(&self, cql: String) -> StorageResult<()> {
        self.raw_rows(cql).map(drop)
    }

    /// Runs one unprepared statement; each row rendered with `Debug`.
    fn raw_rows(&self, cql: String) -> StorageResult<Vec<String>> {
        let inner = self.inner.clone();
        self.side.call_with_timeout(
            async move {
                let mut statement = Statement::new(cql);
                statement.set_request_timeout(Some(DDL_TIMEOUT));
                let result = inner.session.query_unpaged(statement, &[]).await.map_err(execution_error)?;
                let Ok(rows) = result.into_rows_result() else { return Ok(Vec::new()) };
                rows.rows::<CqlRow>().map_err(engine)?.map(|r| r.map(|r| format!("{r:?}")).map_err(engine)).collect()
            },
            DDL_TIMEOUT,
        )?
    }
}

impl Inner {
    async fn statement(&self, table: Table, kind: usize) -> StorageResult<&PreparedStatement> {
        let t = self.tables.get(&table).ok_or_else(|| engine(format!("table {} not prepared", table.name())))?;
        t.prepared[kind]
            .get_or_try_init(|| async {
                let mut p = self.session.prepare(statement_text(&t.name, kind)).await.map_err(prepare_error)?;
                // Everything but the conditional insert may be retried by the driver.
                p.set_is_idempotent(kind != KIND_LWT);
                p.set_page_size(SCAN_PAGE_ROWS);
                Ok(p)
            })
            .await
    }

    /// Runs `attempt` until it succeeds, fails for good, or `retries` are spent.
    async fn retrying<T, Fut>(&self, mut attempt: impl FnMut() -> Fut) -> StorageResult<T>
    where
        Fut: Future<Output = StorageResult<T>>,
    {
        let mut delay = RETRY_BACKOFF;
        for _ in 0..self.retries {
            match attempt().await {
                Err(StorageError::Unavailable(e)) => {
                    tracing::debug!(error = %e, ?delay, "retrying CQL request");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                done => return done,
            }
        }
        attempt().await
    }

    async fn execute(&self, p: &PreparedStatement, values: impl scylla::serialize::row::SerializeRow) -> StorageResult<QueryResult> {
        self.session.execute_unpaged(p, values).await.map_err(execution_error)
    }

    async fn get(&self, table: Table, pk: Vec<u8>, ck: Vec<u8>) -> StorageResult<Option<Bytes>> {
        let p = self.statement(table, KIND_GET).await?;
        let result = self.execute(p, (&pk, &ck)).await?;
        let row = result.into_rows_result().map_err(engine)?.maybe_first_row::<(Vec<u8>,)>().map_err(engine)?;
        Ok(row.map(|(v,)| Bytes::from(v)))
    }

    async fn scan(&self, table: Table, pk: Vec<u8>, from: Bound<Vec<u8>>, to: Bound<Vec<u8>>, reverse: bool, limit: i32) -> StorageResult<Vec<Row>> {
        let kind = scan_kind(from.as_ref().map(|_| ()), to.as_ref().map(|_| ()), reverse);
        let p = self.statement(table, kind).await?;
        let mut values = vec![CqlValue::Blob(pk)];
        for b in [from, to] {
            if let Bound::Included(ck) | Bound::Excluded(ck) = b {
                values.push(CqlValue::Blob(ck));
            }
        }
        values.push(CqlValue::Int(limit));
        // Paged (SCAN_PAGE_ROWS per response) so a large scan never needs one
        // huge frame on either side; LIMIT stops the server at `limit`.
        let mut out = Vec::new();
        let mut paging = PagingState::start();
        loop {
            let (result, next) = self.session.execute_single_page(p, &values, paging).await.map_err(execution_error)?;
            let rows = result.into_rows_result().map_err(engine)?;
            for row in rows.rows::<(Vec<u8>, Vec<u8>)>().map_err(engine)? {
                let (ck, v) = row.map_err(engine)?;
                out.push((Bytes::from(ck), Bytes::from(v)));
            }
            match next.into_paging_control_flow() {
                ControlFlow::Continue(state) if out.len() < limit as usize => paging = state,
                _ => return Ok(out),
            }
        }
    }

    async fn write(&self, writes: &[Write], timestamp: i64) -> StorageResult<()> {
        // Values are borrowed: a retry re-sends the same cells.
        let mut statements = Vec::with_capacity(writes.len());
        let mut values: Vec<Vec<&Vec<u8>>> = Vec::with_capacity(writes.len());
        for w in writes {
            let (p, v) = match w {
                Write::Put { table, pk, ck, value } => (self.statement(*table, KIND_PUT).await?, vec![pk, ck, value]),
                Write::Delete { table, pk, ck } => (self.statement(*table, KIND_DELETE).await?, vec![pk, ck]),
                Write::DeleteRange { table, pk, from, to } => (self.statement(*table, KIND_DELETE_RANGE).await?, vec![pk, from, to]),
            };
            statements.push(p);
            values.push(v);
        }
        if let ([p], [v]) = (&statements[..], &values[..]) {
            // One write needs no batch log.
            let mut p = (*p).clone();
            p.set_timestamp(Some(timestamp));
            return self.execute(&p, v).await.map(drop);
        }
        let mut batch = Batch::new(BatchType::Logged);
        for p in statements {
            batch.append_statement(p.clone());
        }
        batch.set_timestamp(Some(timestamp));
        batch.set_is_idempotent(true);
        self.session.batch(&batch, values).await.map(drop).map_err(execution_error)
    }

    async fn insert_if_absent(&self, table: Table, pk: Vec<u8>, ck: Vec<u8>, value: Vec<u8>) -> StorageResult<Option<Bytes>> {
        let p = self.statement(table, KIND_LWT).await?;
        let result = self.execute(p, (&pk, &ck, &value)).await?;
        let rows = result.into_rows_result().map_err(engine)?;
        let v_index = rows.column_specs().get_by_name("v").map(|(i, _)| i);
        let row = rows.single_row::<CqlRow>().map_err(engine)?;
        match row.columns.first() {
            Some(Some(CqlValue::Boolean(true))) => Ok(None),
            Some(Some(CqlValue::Boolean(false))) => match v_index.and_then(|i| row.columns.get(i)) {
                Some(Some(CqlValue::Blob(existing))) => Ok(Some(Bytes::from(existing.clone()))),
                // A row without a value: present, but empty.
                Some(None) => Ok(Some(Bytes::new())),
                other => Err(engine(format!("unexpected conditional insert result column v: {other:?}"))),
            },
            other => Err(engine(format!("unexpected conditional insert result: {other:?}"))),
        }
    }
}

/// Keeps only the last write to each row, in the original order. All writes
/// of a batch share one timestamp, and on a tie CQL lets a delete win over a
/// put whatever their order; the interface promises the batch's order.
fn last_write_per_row(writes: Vec<Write>) -> Vec<Write> {
    if writes.len() < 2 {
        return writes;
    }
    let mut seen = std::collections::HashSet::with_capacity(writes.len());
    let mut kept: Vec<Write> = writes
        .into_iter()
        .rev()
        .filter(|w| {
            match w {
                Write::Put { table, pk, ck, .. } | Write::Delete { table, pk, ck } => seen.insert((*table, pk.clone(), ck.clone())),
                // `check_batch` keeps row writes out of deleted ranges.
                Write::DeleteRange { .. } => true,
            }
        })
        .collect();
    kept.reverse();
    kept
}

impl Store for Cql {
    fn get(&self, table: Table, pk: &[u8], ck: &[u8]) -> StorageResult<Option<Bytes>> {
        super::check_pk(pk)?;
        let (pk, ck) = (pk.to_vec(), ck.to_vec());
        self.run(|inner| async move { inner.retrying(|| inner.get(table, pk.clone(), ck.clone())).await })
    }

    fn scan(&self, scan: Scan<'_>) -> StorageResult<Vec<Row>> {
        super::check_pk(scan.pk)?;
        if scan.limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i32::try_from(scan.limit).unwrap_or(i32::MAX);
        let (table, reverse, pk) = (scan.table, scan.reverse, scan.pk.to_vec());
        let (from, to) = (scan.from.map(<[u8]>::to_vec), scan.to.map(<[u8]>::to_vec));
        self.run(|inner| async move { inner.retrying(|| inner.scan(table, pk.clone(), from.clone(), to.clone(), reverse, limit)).await })
    }

    fn write(&self, writes: Vec<Write>) -> StorageResult<()> {
        if writes.is_empty() {
            return Ok(());
        }
        super::check_batch(&writes)?;
        let writes = last_write_per_row(writes);
        self.run(|inner| async move {
            let timestamp = inner.timestamps.next_timestamp();
            inner.retrying(|| inner.write(&writes, timestamp)).await
        })
    }

    fn insert_if_absent(&self, table: Table, pk: &[u8], ck: &[u8], value: &[u8]) -> StorageResult<Option<Bytes>> {
        super::check_pk(pk)?;
        let (pk, ck, value) = (pk.to_vec(), ck.to_vec(), value.to_vec());
        self.run(|inner| async move { inner.insert_if_absent(table, pk, ck, value).await })
    }

    fn flush(&self) -> StorageResult<()> {
        // Acknowledged writes are already on the replicas (their commit log
        // decides power-loss durability); there is nothing buffered here.
        Ok(())
    }
}

#[cfg(test)]
mod tests;

/// The rustls client configuration for `storage.scylla.tls`, on ring's
/// provider; `None` without TLS.
fn tls_config(config: &CqlConfig) -> StorageResult<Option<Arc<rustls::ClientConfig>>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    if !config.tls {
        return Ok(None);
    }
    let bad = |what: &str, e: &dyn std::fmt::Display| engine(format!("storage.scylla TLS: {what}: {e}"));
    let ca = config.tls_ca_file.as_ref().ok_or_else(|| engine("storage.scylla.tls needs tls_ca_file"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| bad(&ca.display().to_string(), &e))? {
        roots.add(cert.map_err(|e| bad(&ca.display().to_string(), &e))?).map_err(|e| bad(&ca.display().to_string(), &e))?;
    }
    if roots.is_empty() {
        return Err(engine(format!("storage.scylla TLS: no certificate in {}", ca.display())));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().map_err(|e| bad("protocol versions", &e))?;
    let builder = match &config.tls_server_name {
        Some(name) => {
            let name = ServerName::try_from(name.clone()).map_err(|e| bad("tls_server_name", &e))?;
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build().map_err(|e| bad("verifier", &e))?;
            builder.dangerous().with_custom_certificate_verifier(Arc::new(NamedVerifier { inner, name }))
        }
        None => builder.with_root_certificates(roots),
    };
    let client = match (&config.tls_client_cert_file, &config.tls_client_key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| bad(&cert.display().to_string(), &e))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(&key.display().to_string(), &e))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| bad("client certificate", &e))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Some(Arc::new(client)))
}

/// Checks the database's certificate against a configured name instead of
/// the node's IP address (the driver always passes the address); the chain
/// is still verified against the configured authorities.
#[derive(Debug)]
struct NamedVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: rustls::pki_types::ServerName<'static>,
}

impl rustls::client::danger::ServerCertVerifier for NamedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _address: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
