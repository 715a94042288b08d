use clap::Parser;
use portslice_operator::config::{Cli, Config, Env};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::load(Cli::parse(), &Env::from_process())?;
    portslice_operator::telemetry::init(config.log_format);
    portslice_operator::run(config).await
}
