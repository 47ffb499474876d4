module github.com/handoff-dev/handoff

go 1.26

require (
	github.com/cloudflare/tableflip v1.2.3
	golang.org/x/sys v0.43.0
)
