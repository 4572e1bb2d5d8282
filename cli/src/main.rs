//! The `tether` command.
fn main() {
    println!("tether: not yet");
}
