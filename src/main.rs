use clap::Parser;

fn main() -> std::process::ExitCode {
    safe::init_threads();
    let cli = safe::cli::Cli::parse(); // usage errors exit 2, --help/--version exit 0 (clap)
    match safe::on_pool(move || safe::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::from(safe::exit::SUCCESS as u8),
        Err(failure) => {
            // Not eprintln!: after SIGHUP the terminal may be gone, and a failed write must not turn exit 130
            // into a panic's 101.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "error: {}", failure.message());
            std::process::ExitCode::from(failure.code as u8)
        }
    }
}
