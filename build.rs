//! With the `onednn` feature, compile the C shim over oneDNN's matmul primitive (src/model/onednn_bf16.c: the
//! bf16 products, for which oneDNN 2.6 has no BLAS-style call). Without it there is nothing to build.

fn main() {
    #[cfg(feature = "onednn")]
    {
        println!("cargo:rerun-if-changed=src/model/onednn_bf16.c");
        cc::Build::new().file("src/model/onednn_bf16.c").opt_level(2).warnings(true).compile("safe_onednn_bf16");
    }
}
