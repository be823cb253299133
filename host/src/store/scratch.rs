//! Throwaway PostgreSQL databases for tests (the store's own and the
//! end-to-end ones): each test gets a database of its own on the server
//! `HANGAR_TEST_DATABASE_URL` names, so tests run in parallel, and the
//! database is dropped when the test ends. `test.sh` starts that server.

use std::time::{SystemTime, UNIX_EPOCH};

/// The variable naming the server (any database on it, usually `postgres`,
/// through which the scratch databases are created and dropped).
pub const TEST_DATABASE_URL: &str = "HANGAR_TEST_DATABASE_URL";

/// A database made for one test; dropped with this value.
pub struct ScratchDb {
    admin: String,
    name: String,
    /// `postgres://…/hangar_test_…`: what `--db` is given.
    pub url: String,
}

impl ScratchDb {
    /// A fresh database, or `None` (with the reason printed) when no server
    /// is named. With `CI` set a missing server fails the test instead:
    /// CI never skips the PostgreSQL tests.
    pub async fn create() -> Option<ScratchDb> {
        let Some(admin) = std::env::var(TEST_DATABASE_URL).ok().filter(|url| !url.is_empty()) else {
            if std::env::var_os("CI").is_some() {
                panic!("{TEST_DATABASE_URL} is not set, and CI is: the PostgreSQL tests must run (test.sh starts a server)");
            }
            eprintln!("skipped: {TEST_DATABASE_URL} is not set (test.sh sets it), so there is no PostgreSQL to test against");
            return None;
        };
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let name = format!("hangar_test_{}_{:x}", std::process::id(), nanos ^ (rand_u64() as u128));
        let mut url = url::Url::parse(&admin).unwrap_or_else(|e| panic!("{TEST_DATABASE_URL} is not a URL: {e}"));
        url.set_path(&name);
        let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {TEST_DATABASE_URL}: {e}"));
        let connection = tokio::spawn(connection);
        client.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("CREATE DATABASE");
        drop(client);
        let _ = connection.await;
        Some(ScratchDb { admin, name, url: url.to_string() })
    }
}

/// Per-process randomness for database names (no `rand` dependency for
/// this): the std hasher is seeded randomly.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u8(0);
    hasher.finish()
}

impl Drop for ScratchDb {
    /// Drops the database on a thread of its own (a drop cannot wait on the
    /// test's runtime); `FORCE` ends connections a pool still holds.
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await.map_err(std::io::Error::other)?;
                tokio::spawn(connection);
                client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await.map_err(std::io::Error::other)
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop the test database {}: {dropped:?}", self.name);
        }
    }
}
