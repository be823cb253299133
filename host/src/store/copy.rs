//! `hangar migrate`: a SQLite database copied into a PostgreSQL one, table
//! by table and value by value, in one PostgreSQL transaction.
//!
//! The tables and their columns are read from SQLite's own catalogue
//! (`sqlite_master`, `pragma_table_info`), not listed here, so a table a
//! later migration adds is copied without anyone remembering to. Both
//! databases are at the latest schema first (their stores migrated them),
//! and the two schemas have the same tables and column names (see
//! `pg::migrations`).

use std::collections::HashMap;
use std::error::Error;
use std::path::Path;

use bytes::BytesMut;
use rusqlite::types::ValueRef;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use super::plugins::{StoredPlugin, pg_put};
use super::{Db, Sqlite, Store, StoreError, pg};

/// Rows sent from the SQLite reader to the PostgreSQL writer at a time
/// (and written as one pipeline).
const BATCH: usize = 256;

/// Rows that migrating a new database writes by itself (the default
/// tenant): a target holding only these is empty. They are replaced by
/// the source's.
const SEEDED: [(&str, &str); 1] = [("tenants", "id = 'default'")];

/// What a copy did, table by table.
#[derive(Debug, Clone, Default)]
pub struct CopyReport {
    /// In the order they were copied (a table after those it references).
    pub tables: Vec<TableCopy>,
}

/// One table's rows, counted in both databases once copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCopy {
    /// The table's name, the same in both databases.
    pub name: String,
    /// Rows in the SQLite table.
    pub sqlite: u64,
    /// Rows added besides those (plugins read from files into `plugins`).
    pub added: u64,
    /// Rows in the PostgreSQL table: `sqlite + added`, or the copy failed.
    pub postgres: u64,
}

/// What the reader sends: a table's name, columns and row count, then its
/// rows in batches.
enum Feed {
    Table { name: String, columns: Vec<String>, rows: u64 },
    Rows(Vec<Vec<Cell>>),
}

/// One SQLite value, written into whatever type the PostgreSQL column has
/// where that loses nothing (SQLite INTEGER into BIGINT, TEXT into TEXT,
/// BLOB into BYTEA, NULL into anything).
#[derive(Debug)]
enum Cell {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl Cell {
    fn of(value: ValueRef<'_>) -> rusqlite::Result<Cell> {
        Ok(match value {
            ValueRef::Null => Cell::Null,
            ValueRef::Integer(n) => Cell::Integer(n),
            ValueRef::Real(x) => Cell::Real(x),
            ValueRef::Text(bytes) => Cell::Text(std::str::from_utf8(bytes).map_err(rusqlite::Error::Utf8Error)?.to_string()),
            ValueRef::Blob(bytes) => Cell::Blob(bytes.to_vec()),
        })
    }

    fn kind(&self) -> &'static str {
        match self {
            Cell::Null => "NULL",
            Cell::Integer(_) => "INTEGER",
            Cell::Real(_) => "REAL",
            Cell::Text(_) => "TEXT",
            Cell::Blob(_) => "BLOB",
        }
    }
}

impl ToSql for Cell {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        let text = *ty == Type::TEXT || *ty == Type::VARCHAR;
        match self {
            Cell::Null => return Ok(IsNull::Yes),
            Cell::Integer(n) if *ty == Type::INT8 => return n.to_sql(ty, out),
            Cell::Integer(n) if *ty == Type::INT4 => return i32::try_from(*n)?.to_sql(ty, out),
            Cell::Integer(n) if *ty == Type::BOOL => return (*n != 0).to_sql(ty, out),
            Cell::Integer(n) if text => return n.to_string().to_sql(ty, out),
            Cell::Real(x) if *ty == Type::FLOAT8 => return x.to_sql(ty, out),
            Cell::Real(x) if text => return x.to_string().to_sql(ty, out),
            Cell::Text(s) if text => return s.to_sql(ty, out),
            Cell::Blob(b) if *ty == Type::BYTEA => return b.to_sql(ty, out),
            _ => {}
        }
        Err(format!("a SQLite {} value does not fit a PostgreSQL {ty} column", self.kind()).into())
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// `name` as a quoted identifier (both dialects quote alike).
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl Store {
    /// Copies this SQLite database into `target`, a PostgreSQL database
    /// holding no data yet, with `plugins` (read from the SQLite server's
    /// files) added to its `plugins` table: all in one transaction, which
    /// commits only if every table then counts the rows it should.
    /// Sealed values (provider keys, MCP secrets) are copied as they are.
    pub async fn copy_into(&self, target: &Store, plugins: Vec<StoredPlugin>) -> Result<CopyReport, StoreError> {
        let (Db::Sqlite(from), Db::Postgres(to)) = (&self.db, &target.db) else { return Err(StoreError::CopyDirection) };
        let mut c = to.client().await?;
        let tx = c.transaction().await?;
        // A second `hangar migrate` at the same moment waits here, then finds the data.
        pg::lock(&tx, "hangar migrate").await?;
        let holding = tables_with_rows(&tx).await?;
        if !holding.is_empty() {
            return Err(StoreError::TargetNotEmpty { tables: holding });
        }
        for (table, seeded) in SEEDED {
            tx.execute(&format!("DELETE FROM {} WHERE {seeded}", quoted(table)), &[]).await?;
        }

        let (feed, mut fed) = tokio::sync::mpsc::channel(2);
        let path = from.path.clone();
        let reader = tokio::task::spawn_blocking(move || read_tables(&path, &feed));
        let mut tables = Vec::new();
        let mut insert = None;
        while let Some(item) = fed.recv().await {
            match item {
                Feed::Table { name, columns, rows } => {
                    let statement = format!(
                        "INSERT INTO {} ({}) VALUES ({})",
                        quoted(&name),
                        columns.iter().map(|c| quoted(c)).collect::<Vec<_>>().join(", "),
                        (1..=columns.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
                    );
                    let failed = |e| copy_failed(&name, e);
                    insert = Some((tx.prepare(&statement).await.map_err(failed)?, name.clone()));
                    tables.push(TableCopy { name, sqlite: rows, added: 0, postgres: 0 });
                }
                Feed::Rows(batch) => {
                    let Some((statement, name)) = &insert else { continue };
                    let tx = &tx;
                    // Sent together: tokio-postgres pipelines them on the connection.
                    futures::future::try_join_all(batch.iter().map(|row| async move {
                        let params: Vec<&(dyn ToSql + Sync)> = row.iter().map(|cell| cell as &(dyn ToSql + Sync)).collect();
                        tx.execute(statement, &params).await
                    }))
                    .await
                    .map_err(|e| copy_failed(name, e))?;
                }
            }
        }
        // The reader's error, if it stopped early (before anything commits).
        reader.await.map_err(|e| StoreError::Task(e.to_string()))??;

        let mut added = 0;
        for plugin in &plugins {
            added += pg_put(&tx, plugin).await? as u64;
        }
        match tables.iter_mut().find(|t| t.name == "plugins") {
            Some(table) => table.added = added,
            None if !plugins.is_empty() => tables.push(TableCopy { name: "plugins".into(), sqlite: 0, added, postgres: 0 }),
            None => {}
        }
        for table in &mut tables {
            table.postgres = pg::count(&tx.query_one(&format!("SELECT COUNT(*) FROM {}", quoted(&table.name)), &[]).await?, 0);
            if table.postgres != table.sqlite + table.added {
                return Err(StoreError::CountMismatch { table: table.name.clone(), sqlite: table.sqlite + table.added, postgres: table.postgres });
            }
        }
        tx.commit().await?;
        Ok(CopyReport { tables })
    }
}

fn copy_failed(table: &str, err: tokio_postgres::Error) -> StoreError {
    StoreError::CopyTable { table: table.to_string(), reason: pg::reason(&err) }
}

/// The tables of the PostgreSQL database (but its migration bookkeeping)
/// that hold rows, seeded rows aside.
async fn tables_with_rows(tx: &deadpool_postgres::Transaction<'_>) -> Result<Vec<String>, StoreError> {
    let tables = tx
        .query(
            "SELECT tablename::TEXT FROM pg_tables WHERE schemaname = current_schema() AND tablename <> 'schema_migrations' ORDER BY 1",
            &[],
        )
        .await?;
    let mut holding = Vec::new();
    for table in tables {
        let name: String = table.get(0);
        let seeded = SEEDED.iter().find(|(t, _)| *t == name).map(|(_, seeded)| format!(" WHERE NOT ({seeded})")).unwrap_or_default();
        let any: bool = tx.query_one(&format!("SELECT EXISTS (SELECT 1 FROM {}{seeded})", quoted(&name)), &[]).await?.get(0);
        if any {
            holding.push(name);
        }
    }
    Ok(holding)
}

/// Reads every table of the SQLite database at `path` into `feed`, in one
/// read transaction (so the counts and the rows agree), a table after the
/// tables its foreign keys name.
fn read_tables(path: &Path, feed: &tokio::sync::mpsc::Sender<Feed>) -> Result<(), StoreError> {
    let send = |item| feed.blocking_send(item).map_err(|_| StoreError::Task("the copy into PostgreSQL stopped".into()));
    let mut conn = Sqlite::open_reader(path)?;
    let tx = conn.transaction()?;
    for table in tables_in_order(&tx)? {
        let columns: Vec<String> =
            tx.prepare("SELECT name FROM pragma_table_info(?1) ORDER BY cid")?.query_map([&table], |r| r.get(0))?.collect::<Result<_, _>>()?;
        let rows: i64 = tx.query_row(&format!("SELECT COUNT(*) FROM {}", quoted(&table)), [], |r| r.get(0))?;
        let select = format!("SELECT {} FROM {}", columns.iter().map(|c| quoted(c)).collect::<Vec<_>>().join(", "), quoted(&table));
        let width = columns.len();
        send(Feed::Table { name: table, columns, rows: rows.max(0) as u64 })?;
        let mut statement = tx.prepare(&select)?;
        let mut found = statement.query([])?;
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(row) = found.next()? {
            batch.push((0..width).map(|i| Cell::of(row.get_ref(i)?)).collect::<rusqlite::Result<Vec<_>>>()?);
            if batch.len() == BATCH {
                send(Feed::Rows(std::mem::replace(&mut batch, Vec::with_capacity(BATCH))))?;
            }
        }
        if !batch.is_empty() {
            send(Feed::Rows(batch))?;
        }
    }
    Ok(())
}

/// The SQLite tables (SQLite's own aside), each after the tables its
/// foreign keys reference, otherwise by name.
fn tables_in_order(c: &rusqlite::Connection) -> Result<Vec<String>, StoreError> {
    let names: Vec<String> = c
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND name <> 'schema_migrations' ORDER BY name")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut references = HashMap::new();
    for name in &names {
        let parents: Vec<String> =
            c.prepare("SELECT \"table\" FROM pragma_foreign_key_list(?1)")?.query_map([name], |r| r.get(0))?.collect::<Result<_, _>>()?;
        references.insert(name.clone(), parents);
    }
    let mut ordered: Vec<String> = Vec::with_capacity(names.len());
    while ordered.len() < names.len() {
        let ready: Vec<String> = names
            .iter()
            .filter(|n| !ordered.contains(n))
            .filter(|n| references[*n].iter().all(|p| p == *n || ordered.contains(p) || !names.contains(p)))
            .cloned()
            .collect();
        if ready.is_empty() {
            // A cycle of references (none in the schema today): the rest by
            // name, and PostgreSQL says which reference a row breaks.
            let rest: Vec<String> = names.iter().filter(|n| !ordered.contains(n)).cloned().collect();
            ordered.extend(rest);
        } else {
            ordered.extend(ready);
        }
    }
    Ok(ordered)
}
