//! Federation links, catalog and mesh DNS (filled by the federation issue).
