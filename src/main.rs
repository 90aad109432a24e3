//! The `betadpo` command line.

mod cli;

fn main() {
    // Like other command-line tools, stop quietly when the reader of our output goes away
    // (`betadpo ... | head`), instead of panicking on a broken pipe.
    // SAFETY: restoring the default disposition of a signal, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
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
