//! The checked-in C header must equal what cbindgen generates from src/lib.rs.
//! Regenerate with `XPM_BLESS=1 cargo test -p xpm-plugin-api`.

use std::path::Path;

#[test]
fn c_header_matches_the_rust_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config {
        language: cbindgen::Language::C,
        include_guard: Some("XPM_PLUGIN_H".into()),
        header: Some(
            "/* xpm merge plugin ABI 1.1. Generated from plugins/xpm-plugin-api/src/lib.rs by\n * cbindgen; do not edit (XPM_BLESS=1 cargo test -p xpm-plugin-api regenerates it). */"
                .into(),
        ),
        no_includes: false,
        sys_includes: vec!["stdint.h".into(), "stddef.h".into()],
        usize_is_size_t: true,
        cpp_compat: true,
        documentation: true,
        export: cbindgen::ExportConfig {
            // No function is exported from this crate, so name every type the ABI uses.
            include: [
                "XpmStr",
                "XpmBuf",
                "XpmTensorView",
                "XpmOutputView",
                "XpmPluginDescriptorV1",
                "XpmEntryV1",
            ]
            .map(String::from)
            .to_vec(),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut out);
    let want = String::from_utf8(out).unwrap();
    let path = dir.join("include/xpm_plugin.h");
    if std::env::var_os("XPM_BLESS").is_some() {
        std::fs::write(&path, &want).unwrap();
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "include/xpm_plugin.h drifted from src/lib.rs; run `XPM_BLESS=1 cargo test -p xpm-plugin-api` and commit"
    );
}
