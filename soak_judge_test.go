package main

// How the soak (soak_test.go) decides that a figure grows. The judge lives
// apart from the soak so that it is tested in every run, on made-up series
// whose answer is known: a leak must fail, a swing of the same size must
// not.

import (
	"fmt"
	"math"
	"testing"
)

// judge is how a figure's growth per hour is measured over the run's
// second half, after the retention has filled and the caches have warmed.
type judge int

const (
	// bySlope fits a line to the second half by least squares. Right for
	// a figure that moves smoothly: a Go process's memory, its goroutines,
	// threads and files.
	bySlope judge = iota
	// byCeiling compares the highest value of the run's fourth quarter
	// with the highest of its second. Right for a size that grows a chunk
	// at a time and gives chunks back (a table between vacuums, Kafka's
	// log between retention checks): a line through such a saw-tooth tilts
	// with where in a tooth the run ends, while a leak lifts the ceiling.
	byCeiling
	// atFixedGiven fits time and another figure (given) together by least
	// squares and takes the part that time alone explains: the growth at
	// a fixed value of the given figure. Right for PostgreSQL, whose
	// memory and files follow the number of its processes, which swings
	// as the pools open connections for a burst and close them when idle
	// or old (database.go): what must not grow is what each holds.
	atFixedGiven
)

// growth is the figure's growth per hour under its judge, and a few words
// saying how it was measured. given is the given figure's samples (only
// for atFixedGiven).
func growth(j judge, times, ys, given []float64) (float64, string) {
	switch j {
	case byCeiling:
		end := times[len(times)-1]
		second := ceiling(times, ys, end/4, end/2)
		fourth := ceiling(times, ys, end*3/4, end+1) // the last sample too
		return (fourth - second) / (end / 2 / 3600), fmt.Sprintf("peaks %.1f → %.1f", second, fourth)
	case atFixedGiven:
		return slopeGiven(times, ys, given), "at a fixed number of processes"
	default:
		return slopePerHour(times, ys), "slope"
	}
}

// ceiling is the highest of ys read (a failed read is NaN) at times in
// [from, to).
func ceiling(times, ys []float64, from, to float64) float64 {
	m := math.NaN() // none read yet
	for i, y := range ys {
		if times[i] < from || times[i] >= to || math.IsNaN(y) {
			continue
		}
		if math.IsNaN(m) || y > m {
			m = y
		}
	}
	return m
}

// slopePerHour fits a line to the second half of (x seconds, y) by least
// squares and returns its slope per hour.
func slopePerHour(xs, ys []float64) float64 {
	var n, sx, sy, sxx, sxy float64
	for i := len(xs) / 2; i < len(xs); i++ {
		if math.IsNaN(ys[i]) {
			continue
		}
		n++
		sx += xs[i]
		sy += ys[i]
		sxx += xs[i] * xs[i]
		sxy += xs[i] * ys[i]
	}
	if n < 2 || n*sxx == sx*sx {
		return 0
	}
	return (n*sxy - sx*sy) / (n*sxx - sx*sx) * 3600
}

// slopeGiven fits y = a + b·x + c·g to the second half by least squares
// and returns b per hour: how y moves with time when g is held fixed. If g
// did not move, or moved in step with time, that is the plain slope.
func slopeGiven(xs, ys, gs []float64) float64 {
	var n, mx, my, mg float64
	for i := len(xs) / 2; i < len(xs); i++ {
		if !math.IsNaN(ys[i]) && !math.IsNaN(gs[i]) {
			n++
			mx, my, mg = mx+xs[i], my+ys[i], mg+gs[i]
		}
	}
	if n < 3 {
		return 0
	}
	mx, my, mg = mx/n, my/n, mg/n
	// The normal equations of the centred variables.
	var sxx, sgg, sxg, sxy, sgy float64
	for i := len(xs) / 2; i < len(xs); i++ {
		if math.IsNaN(ys[i]) || math.IsNaN(gs[i]) {
			continue
		}
		x, y, g := xs[i]-mx, ys[i]-my, gs[i]-mg
		sxx, sgg, sxg, sxy, sgy = sxx+x*x, sgg+g*g, sxg+x*g, sxy+x*y, sgy+g*y
	}
	det := sxx*sgg - sxg*sxg
	if sgg == 0 || math.Abs(det) < 1e-9*sxx*sgg {
		return slopePerHour(xs, ys)
	}
	return (sxy*sgg - sgy*sxg) / det * 3600
}

// TestSoakJudge feeds the judge an hour of made-up samples every five
// seconds: each judge must pass a figure that only swings and fail one that
// grows by twice the bound under the same swing.
func TestSoakJudge(t *testing.T) {
	const bound = 1.0 // per hour
	var times []float64
	for s := 0.0; s <= 3600; s += 5 {
		times = append(times, s)
	}
	series := func(f func(s float64) float64) []float64 {
		ys := make([]float64, len(times))
		for i, s := range times {
			ys[i] = f(s)
		}
		return ys
	}
	leak := func(s float64) float64 { return 2 * bound * s / 3600 }
	// A saw-tooth that rises by 1 over half an hour and drops at once, as
	// a table between vacuums: a line through the second half, one rising
	// tooth, calls it a growth of 2/h.
	saw := func(s float64) float64 { return math.Mod(s, 1800) / 1800 }
	// Processes: 11 to 13 over a half-hour cycle, each holding 2.8 (MiB
	// or files), as PostgreSQL's under the pools.
	procs := series(func(s float64) float64 { return 12 + math.Round(math.Sin(s/1800*2*math.Pi+1)) })
	perProc := func(i int) float64 { return 136 + 2.8*procs[i] }

	for _, c := range []struct {
		name  string
		judge judge
		ys    []float64
		given []float64
		leaks bool
		// plainOver: a line through the second half would call it over
		// the bound (so the case shows what the judge adds, or that the
		// series is what it claims).
		plainOver bool
	}{
		{"slope, flat with noise", bySlope, series(func(s float64) float64 { return 28 + 0.05*math.Sin(s) }), nil, false, false},
		{"slope, leak", bySlope, series(func(s float64) float64 { return 28 + leak(s) }), nil, true, true},
		{"ceiling, saw-tooth", byCeiling, series(saw), nil, false, true},
		{"ceiling, saw-tooth on a leak", byCeiling, series(func(s float64) float64 { return saw(s) + leak(s) }), nil, true, true},
		{"ceiling, a step early in the run", byCeiling, series(func(s float64) float64 { return 100 + 20*math.Min(1, s/600) + saw(s) }), nil, false, true},
		{"fixed processes, pool swing", atFixedGiven, func() []float64 {
			ys := make([]float64, len(times))
			for i := range ys {
				ys[i] = perProc(i)
			}
			return ys
		}(), procs, false, true},
		{"fixed processes, pool swing on a leak", atFixedGiven, func() []float64 {
			ys := make([]float64, len(times))
			for i, s := range times {
				ys[i] = perProc(i) + leak(s)
			}
			return ys
		}(), procs, true, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			if plain := slopePerHour(times, c.ys); (math.Abs(plain) > bound) != c.plainOver {
				t.Fatalf("made-up series wrong: its plain slope is %+.2f/h", plain)
			}
			got, how := growth(c.judge, times, c.ys, c.given)
			if (got > bound) != c.leaks {
				t.Errorf("growth %+.2f/h (%s) against a bound of %g/h: leak=%v", got, how, bound, c.leaks)
			}
		})
	}
}
