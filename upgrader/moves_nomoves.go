//go:build handoff_nomoves

package upgrader

// Built with -tags handoff_nomoves, a generation plays an older binary: it
// does not take the moves channel, so its previous generation moves nothing to
// it and falls back.
func init() { takesMoves = false }
