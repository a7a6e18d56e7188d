//! Test scratch hygiene shared by the workspace's test helpers (`tests/common`,
//! `actors/tests/common` includes this file by path).

/// Removes `<prefix>-<pid>-<name>` directories in the temp area left by test processes that are
/// gone (their stores add up: hundreds of MB per run), so that repeated runs do not fill the disk.
pub fn sweep_stale(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && pid != std::process::id()
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
