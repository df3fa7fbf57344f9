//! `idempotency-bench`: the load generator. Parses its flags, runs one scenario, prints the report.

use clap::Parser;
use idempotency_bench::{self as bench, Options};

/// Load generator for the idempotency coordinator, and for the same flows hand-rolled on
/// PostgreSQL and Redis, so that all three are measured with one tool and one load shape.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    options: Options,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let json = cli.options.json;
    let report = bench::run(cli.options).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{}", report.to_table());
    }
    Ok(())
}
