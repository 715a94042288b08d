use clap::Parser;
use portslice_operator::config::{Config, Env, Options};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::load(Options::parse(), &Env::from_process())?;
    portslice_operator::telemetry::init(config.log_format);
    portslice_operator::run(config).await
}
