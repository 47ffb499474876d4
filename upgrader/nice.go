package upgrader

import (
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// maxNice is the lowest CPU priority Linux has (the highest nice value).
const maxNice = 19

// lowerPriority adds by to the nice value of every thread of this process (at
// most maxNice) and returns the nice value the last thread got and how many
// threads it changed. Linux keeps a nice value per thread, and a new thread
// takes its creator's: it lists the threads again until a pass finds none left
// to change, so that one the Go runtime starts meanwhile is not missed.
func lowerPriority(by int) (nice, changed int, err error) {
	seen := map[int]bool{}
	for pass := 0; pass < 5; pass++ {
		tasks, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return nice, changed, err
		}
		fresh := 0
		for _, t := range tasks {
			tid, err := strconv.Atoi(t.Name())
			if err != nil || seen[tid] {
				continue
			}
			seen[tid] = true
			fresh++
			// The raw getpriority returns 20 - nice (1 to 40), so that no
			// priority reads as -1, an error.
			prio, err := unix.Getpriority(unix.PRIO_PROCESS, tid)
			if err != nil {
				continue // the thread exited meanwhile
			}
			nice = min(20-prio+by, maxNice)
			if err := unix.Setpriority(unix.PRIO_PROCESS, tid, nice); err != nil {
				if err == unix.ESRCH {
					continue
				}
				return nice, changed, err
			}
			changed++
		}
		if fresh == 0 {
			break
		}
	}
	return nice, changed, nil
}
