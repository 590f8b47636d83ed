fn main() -> std::process::ExitCode {
    match ferry::cli::run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", ferry::cli::error_message(&err));
            std::process::ExitCode::FAILURE
        }
    }
}
