//go:build integration

package main

// ./stack.sh cpu, the command that says where the CPU goes (stack.sh,
// docs/benchmarks.md).

import (
	"regexp"
	"strings"
	"testing"
)

// TestStackCPUCommand runs a command under ./stack.sh cpu and checks that
// it prints a line for every service it ran, and one for the stack, each
// with its CPU seconds and share of a core, and the microseconds per
// operation when asked. The local stack only: compose has no such verb.
func TestStackCPUCommand(t *testing.T) {
	s := newStack(t)
	if !strings.HasSuffix(s.cmd[0], "stack.sh") {
		t.Skip("./stack.sh cpu reads the local stack's processes; this stack is " + strings.Join(s.cmd, " "))
	}
	t.Setenv("CPU_OPS", "100")
	out := s.control(t, "cpu", "sleep", "1")
	for _, svc := range []string{"db-us", "db-eu", "kafka", "backend-us", "backend-eu", "nginx", "stack"} {
		line := regexp.MustCompile(`(?m)^` + svc + `\s+[0-9]+\.[0-9]{2}\s+[0-9]+\.[0-9]%\s+[0-9]+$`)
		if !line.MatchString(out) {
			t.Errorf("no line for %s with CPU seconds, share of a core and µs per op in:\n%s", svc, out)
		}
	}
	if !strings.Contains(out, "s of wall time, 100 ops") {
		t.Errorf("the wall time and the ops are not said:\n%s", out)
	}
}
