//! MCP servers registered as tools (issue: MCP both ways). Header values
//! and environment values are sealed like provider keys: they are often
//! credentials, and no answer or log ever holds them.

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{Db, Store, StoreError, parse_time, pg, ts};

pub(super) const MIGRATION: &str = "
    CREATE TABLE mcp_servers (
        tenant_id TEXT NOT NULL,
        name TEXT NOT NULL,
        transport TEXT NOT NULL,
        spec TEXT NOT NULL,
        secrets TEXT NOT NULL,
        tools TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (tenant_id, name)
    );
";

/// How the server is reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "transport", rename_all = "snake_case")]
pub enum McpTransport {
    /// Streamable HTTP at `url`.
    Http { url: String },
    /// A program started for each session that uses it, speaking MCP on
    /// its standard input and output.
    Stdio {
        command: String,
        #[serde(default)]
        args: Vec<String>,
    },
}

/// One tool of an MCP server, as it listed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct McpTool {
    /// The server's own name for it (the agent sees `SERVER__NAME`).
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[schema(value_type = Object)]
    pub input_schema: serde_json::Value,
}

/// A registered server. `secrets` are header values (`http`) or
/// environment values (`stdio`), in clear only in memory.
#[derive(Debug, Clone)]
pub struct McpServerRecord {
    /// `''`: server-wide (registered by the admin, or on a single-user server).
    pub tenant_id: String,
    pub name: String,
    pub transport: McpTransport,
    pub secrets: Vec<(String, String)>,
    pub tools: Vec<McpTool>,
    pub created_at: DateTime<Utc>,
}

type Row = (String, String, String, String, String, String);

impl Store {
    fn mcp_record(&self, (tenant_id, name, spec, sealed, tools, created_at): Row) -> Result<McpServerRecord, StoreError> {
        let sealed: Vec<(String, String)> = serde_json::from_str(&sealed)?;
        let secrets = sealed
            .into_iter()
            // A value the server key cannot open (the key was replaced) is
            // left out rather than sent sealed.
            .filter_map(|(k, v)| self.secrets.open(&v).map(|plain| (k, plain)))
            .collect();
        Ok(McpServerRecord {
            tenant_id,
            name,
            transport: serde_json::from_str(&spec)?,
            secrets,
            tools: serde_json::from_str(&tools)?,
            created_at: parse_time(&created_at)?,
        })
    }

    /// Registers a server; a name taken by the owner or server-wide is a clash.
    pub async fn insert_mcp_server(&self, record: McpServerRecord) -> Result<McpServerRecord, StoreError> {
        let spec = serde_json::to_string(&record.transport)?;
        let sealed: Vec<(String, String)> = record.secrets.iter().map(|(k, v)| (k.clone(), self.secrets.seal(v))).collect();
        let sealed = serde_json::to_string(&sealed)?;
        let tools = serde_json::to_string(&record.tools)?;
        let transport = match record.transport {
            McpTransport::Http { .. } => "http",
            McpTransport::Stdio { .. } => "stdio",
        };
        let (tenant, name, created) = (record.tenant_id.clone(), record.name.clone(), ts(&record.created_at));
        const TAKEN: &str = "SELECT name FROM mcp_servers WHERE name = $1 AND (tenant_id = $2 OR tenant_id = '' OR $2 = '')";
        const INSERT: &str =
            "INSERT INTO mcp_servers (tenant_id, name, transport, spec, secrets, tools, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)";
        match &self.db {
            Db::Sqlite(db) => {
                db.write(move |c| {
                    let taken: Option<String> = c.query_row(&pg::sqlite(TAKEN), params![name, tenant], |r| r.get(0)).optional()?;
                    if taken.is_some() {
                        return Err(StoreError::NameTaken { kind: "MCP server", name });
                    }
                    c.execute(&pg::sqlite(INSERT), params![tenant, name, transport, spec, sealed, tools, created])?;
                    Ok(())
                })
                .await?
            }
            Db::Postgres(pg) => {
                let mut c = pg.client().await?;
                let tx = c.transaction().await?;
                // A name is unique across a tenant and the server-wide
                // servers, which no index can say: registrations of a name
                // take turns.
                pg::lock(&tx, &format!("mcp:{name}")).await?;
                if tx.query_opt(TAKEN, &[&name, &tenant]).await?.is_some() {
                    return Err(StoreError::NameTaken { kind: "MCP server", name });
                }
                tx.execute(INSERT, &[&tenant, &name, &transport, &spec, &sealed, &tools, &created]).await?;
                tx.commit().await?;
            }
        }
        Ok(record)
    }

    /// The servers `tenant` may use (its own and the server-wide ones; for
    /// `''` only the server-wide ones), by name.
    pub async fn mcp_servers(&self, tenant: &str) -> Result<Vec<McpServerRecord>, StoreError> {
        const SELECT: &str = "SELECT tenant_id, name, spec, secrets, tools, created_at FROM mcp_servers
             WHERE tenant_id = $1 OR tenant_id = '' ORDER BY name";
        let tenant = tenant.to_string();
        let rows: Vec<Row> = match &self.db {
            Db::Sqlite(db) => {
                db.read(move |c| {
                    let mut stmt = c.prepare_cached(&pg::sqlite(SELECT))?;
                    let rows =
                        stmt.query_map(params![tenant], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))?;
                    Ok(rows.collect::<Result<Vec<_>, _>>()?)
                })
                .await?
            }
            Db::Postgres(pg) => pg.query(SELECT, &[&tenant])
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
                .collect(),
        };
        rows.into_iter().map(|row| self.mcp_record(row)).collect()
    }

    /// Removes the owner's server `name`.
    pub async fn delete_mcp_server(&self, tenant: &str, name: &str) -> Result<(), StoreError> {
        const DELETE: &str = "DELETE FROM mcp_servers WHERE tenant_id = $1 AND name = $2";
        let (tenant, name) = (tenant.to_string(), name.to_string());
        let deleted = match &self.db {
            Db::Sqlite(db) => {
                let name = name.clone();
                db.write(move |c| Ok(c.execute(&pg::sqlite(DELETE), params![tenant, name])?)).await?
            }
            Db::Postgres(pg) => pg.execute(DELETE, &[&tenant, &name]).await?,
        };
        if deleted == 0 {
            return Err(StoreError::NotFound { kind: "MCP server", id: name });
        }
        Ok(())
    }
}
