//! Link flags of the extension.

fn main() {
    // Never unmap the library: PHP dlcloses extensions at module shutdown, and a
    // runtime thread still finishing (or a thread-local destructor) would run code
    // that is gone (a crash at exit once the worker had run).
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
    }
}
