"""The app database: connection, the embedded server, the app-table contract and migrations."""
