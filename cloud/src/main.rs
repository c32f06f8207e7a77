//! `fieldgate-cloud`: serve the API, migrate the database, bootstrap tenants.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fieldgate_cloud::{accounts, api, CloudConfig, Db};

#[derive(Parser)]
#[command(
    name = "fieldgate-cloud",
    version,
    about = "The Fieldgate cloud service"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (HTTPS; gateways use mutual TLS).
    Serve(ServeArgs),
    /// Create or upgrade the database schema, then exit.
    Migrate(Where),
    /// Administration from the service's host.
    #[command(subcommand)]
    Admin(Admin),
    /// Print the OpenAPI document.
    Openapi,
}

#[derive(Args)]
struct Where {
    /// A TOML configuration file (see cloud/fieldgate-cloud.example.toml).
    #[arg(long, conflicts_with = "data_dir")]
    config: Option<PathBuf>,
    /// The data directory, when running on flags alone (SQLite database in it).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

impl Where {
    fn load(&self) -> anyhow::Result<CloudConfig> {
        match (&self.config, &self.data_dir) {
            (Some(path), _) => CloudConfig::load(path),
            (None, Some(dir)) => Ok(CloudConfig::with_data_dir(dir.clone())),
            (None, None) => anyhow::bail!("give --config FILE or --data-dir DIR"),
        }
    }
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    at: Where,
    /// HTTPS listen address (overrides the file).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Plain HTTP on a loopback address, for local tools.
    #[arg(long)]
    http_listen: Option<SocketAddr>,
}

#[derive(Subcommand)]
enum Admin {
    /// Create a tenant and its first owner; prints the owner's one-time password and an owner
    /// API key. There are no default accounts.
    CreateTenant {
        #[command(flatten)]
        at: Where,
        /// The tenant's name: a-z, 0-9, '-' and '_'.
        #[arg(long)]
        name: String,
        #[arg(long)]
        owner_email: String,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve(args) => {
            let mut config = args.at.load()?;
            if let Some(listen) = args.listen {
                config.listen = listen;
            }
            if let Some(http) = args.http_listen {
                config.http_listen = Some(http);
            }
            let mut cloud = fieldgate_cloud::start(config).await?;
            eprintln!("fieldgate-cloud: HTTPS API on https://{}", cloud.https_addr);
            if let Some(addr) = cloud.http_addr {
                eprintln!("fieldgate-cloud: loopback HTTP API on http://{addr}");
            }
            if let Some(ca) = &cloud.ca_path {
                eprintln!(
                    "fieldgate-cloud: clients trust the service CA in {}",
                    ca.display()
                );
            }
            let mut terminate =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                result = cloud.wait() => result?,
                _ = tokio::signal::ctrl_c() => eprintln!("fieldgate-cloud: stopping (interrupt)"),
                _ = terminate.recv() => eprintln!("fieldgate-cloud: stopping (terminate)"),
            }
            cloud.shutdown().await
        }
        Command::Migrate(at) => {
            let config = at.load()?;
            std::fs::create_dir_all(&config.data_dir)?;
            let db = Db::connect(&config.database_url()).await?;
            let applied = db.migrate().await?;
            println!("applied migrations: {applied:?}");
            Ok(())
        }
        Command::Admin(Admin::CreateTenant {
            at,
            name,
            owner_email,
            json,
        }) => {
            let config = at.load()?;
            std::fs::create_dir_all(&config.data_dir)?;
            let db = Db::connect(&config.database_url()).await?;
            db.migrate().await?;
            let made = accounts::bootstrap_tenant(&db, &name, &owner_email)
                .await
                .context("creating the tenant")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&made)?);
            } else {
                println!("tenant {name} ({})", made.tenant_id);
                println!("owner {} ({})", made.owner_email, made.owner_id);
                println!("one-time password: {}", made.owner_password);
                println!("owner API key:     {}", made.api_key);
                println!("These are shown once; store them now.");
            }
            Ok(())
        }
        Command::Openapi => {
            use utoipa::OpenApi;
            println!("{}", api::ApiDoc::openapi().to_pretty_json()?);
            Ok(())
        }
    }
}
