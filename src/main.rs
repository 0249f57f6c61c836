//! The `mailqueue` binary: everything is in the library; see `mailqueue --help`.

fn main() {
    std::process::exit(mailqueue::cli::main());
}
