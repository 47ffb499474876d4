package upgrader

import (
	"os"
	"runtime"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestUsage: the exiting line's peak RSS covers memory this process touched.
func TestUsage(t *testing.T) {
	if _, err := os.Stat("/proc/self/status"); err != nil {
		t.Skip("no /proc/self/status: VmHWM is Linux's")
	}
	b := make([]byte, 64<<20)
	for i := 0; i < len(b); i += 4096 {
		b[i] = 1
	}
	kib, ok := peakRSSKiB()
	require.True(t, ok)
	assert.GreaterOrEqual(t, kib, int64(64<<10))
	runtime.KeepAlive(b)
	attrs := usage()
	require.Len(t, attrs, 4)
	assert.Equal(t, []any{"cpu", "peak_rss_kib"}, []any{attrs[0], attrs[2]})
}
