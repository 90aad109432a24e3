//! The `betadpo` command line.

mod cli;

fn main() {
    if let Err(e) = cli::run() {
        // One line: the error and its causes, joined.
        let mut msg = e.to_string();
        for cause in e.chain().skip(1) {
            let c = cause.to_string();
            if !msg.contains(&c) {
                msg.push_str(": ");
                msg.push_str(&c);
            }
        }
        eprintln!("error: {}", msg.replace('\n', " "));
        std::process::exit(1);
    }
}
