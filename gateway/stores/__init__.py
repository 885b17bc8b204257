"""History stores: one interface (``base``), kept in memory or in Redis."""
