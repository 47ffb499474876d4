package metrics

import "sync"

// countsMu guards every Metrics' counts (few writes: one per upgrade or drain).
var countsMu sync.Mutex
