package main

// How the soak (soak_test.go) decides that a figure grows. The judge lives
// apart from the soak so that it is tested in every run, on made-up series
// whose answer is known: a leak must fail, a swing of the same size must
// not.

import (
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"
	"testing"
)

// judge is how a figure's growth per hour is measured over the run's
// second half, after the retention has filled and the caches have warmed.
type judge int

const (
	// byRises cuts the second half into six parts of equal length and
	// takes the median of each; the growth is the median of the five rises
	// from one part to the next. A leak rises in all five. A step rises in
	// one, or two if it falls inside a part: a Go runtime taking another
	// chunk of memory when its heap peaks, a pool opening connections for
	// a burst and closing them when idle. A line through the half calls
	// such a step a growth (half a megabyte at minute 45 of an hour is
	// +1.4 MiB/h), though all that follows it is flat. The price: a leak
	// that steps less often than every other part (ten minutes of an
	// hour's run) passes, and a longer run is what sees it. Right for what
	// moves smoothly or in steps: a process's memory, threads and files,
	// the goroutines, the live heap.
	byRises judge = iota
	// byCeiling compares the highest value of the run's fourth quarter
	// with the highest of its second. Right for a size that grows a chunk
	// at a time and gives chunks back (a table between vacuums, Kafka's
	// log between retention checks). A saw-tooth rises in every part of a
	// tooth, as a leak does, and a line through it tilts with where in a
	// tooth the run ends; but only a leak lifts the ceiling.
	byCeiling
	// atFixedGiven compares the figure with itself at the same value of
	// another figure (given), half an hour apart: for each value the
	// run's second and fourth quarters both saw, the median in the fourth
	// minus the median in the second. The growth is the median of those.
	// Right for PostgreSQL, whose memory and files follow the number of
	// its processes, which swings as the pools open connections for a
	// burst and close them when idle or old (database.go): what must not
	// grow is what each holds. At a fixed count the figure still wanders
	// by a MiB or two and tens of files, as connections are replaced by
	// younger ones that have touched less, and the quarters give a leak
	// half an hour to rise above that; the six parts of byRises give it
	// five minutes (a rise of a MiB between two parts is 12 an hour).
	// With no value in common the growth is NaN, which fails: taking out
	// what each unit holds instead would hide a leak as large as that
	// estimate's error times the count's move.
	atFixedGiven
)

// growth is the figure's growth per hour under its judge, and a few words
// saying how it was measured. given is the given figure's samples (only
// for atFixedGiven).
func growth(j judge, times, ys, given []float64) (float64, string) {
	line := fmt.Sprintf("; a line: %+.2f/h", slopePerHour(times, ys))
	switch j {
	case byCeiling:
		end := times[len(times)-1]
		second := ceiling(times, ys, end/4, end/2)
		fourth := ceiling(times, ys, end*3/4, end+1) // the last sample too
		return (fourth - second) / (end / 2 / 3600), fmt.Sprintf("peaks %.1f → %.1f", second, fourth) + line
	case atFixedGiven:
		perHour, how := atFixed(times, ys, given)
		return perHour, how + line
	default:
		perHour, steps := rises(times, ys)
		return perHour, "rises " + steps + line
	}
}

// rises is byRises: the median of the rises between the medians of the
// second half's six parts, per hour, and the rises written out. A part
// with no sample read makes the growth NaN, which no bound passes.
func rises(times, ys []float64) (float64, string) {
	const parts = 6
	end := times[len(times)-1]
	part := end / 2 / parts
	var levels, steps []float64
	for k := range parts {
		var in []float64
		from, to := end/2+float64(k)*part, end/2+float64(k+1)*part
		for i, y := range ys {
			if times[i] >= from && (times[i] < to || k == parts-1) && !math.IsNaN(y) {
				in = append(in, y)
			}
		}
		levels = append(levels, median(in))
		if k > 0 {
			steps = append(steps, levels[k]-levels[k-1])
		}
	}
	if slices.ContainsFunc(levels, math.IsNaN) {
		return math.NaN(), "a part with no sample"
	}
	words := make([]string, len(steps))
	for i, s := range steps {
		words[i] = fmt.Sprintf("%+.2f", s)
	}
	return median(steps) / (part / 3600), strings.Join(words, " ")
}

// atFixed is atFixedGiven. A value of the given figure counts when each
// quarter holds a minute of samples of it (twelve, a sample every 5 s): a
// connection that lived for a few samples is no level.
func atFixed(times, ys, given []float64) (float64, string) {
	const minSamples = 12
	end := times[len(times)-1]
	hours := end / 2 / 3600 // from the second quarter to the fourth
	quarter := func(q float64) map[float64][]float64 {
		at := map[float64][]float64{}
		for i, y := range ys {
			if times[i] >= end*q/4 && (times[i] < end*(q+1)/4 || q == 3) && !math.IsNaN(y) && !math.IsNaN(given[i]) {
				at[given[i]] = append(at[given[i]], y)
			}
		}
		return at
	}
	second, fourth := quarter(1), quarter(3)
	var rises []float64
	var words []string
	for _, g := range slices.Sorted(maps.Keys(fourth)) {
		if len(fourth[g]) >= minSamples && len(second[g]) >= minSamples {
			rise := median(fourth[g]) - median(second[g])
			rises = append(rises, rise)
			words = append(words, fmt.Sprintf("%g: %+.2f", g, rise))
		}
	}
	if len(rises) == 0 {
		return math.NaN(), "no count held a minute in both the second quarter and the fourth"
	}
	return median(rises) / hours, "at " + strings.Join(words, ", ") + " (second quarter to fourth)"
}

// median of ys, NaN if there are none.
func median(ys []float64) float64 {
	if len(ys) == 0 {
		return math.NaN()
	}
	s := slices.Sorted(slices.Values(ys))
	if n := len(s); n%2 == 0 {
		return (s[n/2-1] + s[n/2]) / 2
	}
	return s[len(s)/2]
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

// perGiven is how much y moves with each unit of g: the median of the
// jumps of y between consecutive samples of the second half where g moved,
// each divided by g's move. When a connection opens or closes between two
// samples, PostgreSQL's memory moves by what that process holds; between
// them, by what all of them gained. 0 if g never moved: the figure is
// judged as it is.
func perGiven(ys, gs []float64) float64 {
	var each []float64
	for i := len(ys)/2 + 1; i < len(ys); i++ {
		dy, dg := ys[i]-ys[i-1], gs[i]-gs[i-1]
		if dg != 0 && !math.IsNaN(dy) && !math.IsNaN(dg) {
			each = append(each, dy/dg)
		}
	}
	if len(each) == 0 {
		return 0
	}
	return median(each)
}

// TestSoakJudge feeds the judge an hour of made-up samples every five
// seconds: each judge must pass a figure that only swings or steps, and
// fail one that grows by twice the bound under the same swing or step.
func TestSoakJudge(t *testing.T) {
	const bound = 1.0 // per hour
	var times []float64
	for s := 0.0; s <= 3600; s += 5 {
		times = append(times, s)
	}
	series := func(f func(i int, s float64) float64) []float64 {
		ys := make([]float64, len(times))
		for i, s := range times {
			ys[i] = f(i, s)
		}
		return ys
	}
	leak := func(s float64) float64 { return 2 * bound * s / 3600 }
	// One step of half the bound (a Go runtime's memory at minute 45).
	step := func(s float64) float64 {
		if s >= 45*60 {
			return bound / 2
		}
		return 0
	}
	// A burst: five more for minutes 54 to 59 (a pool's connections).
	burst := func(s float64) float64 {
		if s >= 54*60 && s < 59*60 {
			return 5
		}
		return 0
	}
	// A leak that comes in steps, one every five minutes.
	stairs := func(s float64) float64 { return leak(math.Floor(s/300) * 300) }
	// A saw-tooth that rises by 1 over half an hour and drops at once, as
	// a table between vacuums: a line through the second half, one rising
	// tooth, calls it a growth of 2/h.
	saw := func(s float64) float64 { return math.Mod(s, 1800) / 1800 }
	// Processes: 11 to 13 over a half-hour cycle, and a burst to 18 at the
	// end, each holding 2.8 (MiB or files), as PostgreSQL's under the
	// pools; the burst's new processes hold only half that.
	procs := series(func(_ int, s float64) float64 { return 12 + math.Round(math.Sin(s/1800*2*math.Pi+1)) + burst(s) })
	held := func(i int, s float64) float64 { return 136 + 2.8*procs[i] - 1.4*burst(s) }
	// At a fixed count, what the processes hold wanders as connections
	// are replaced by younger ones: here by 0.4 up and down every 25
	// minutes, two parts' rises of 0.25 (3 an hour) each way.
	wander := func(s float64) float64 { return 0.4 * bound * math.Sin(s/1500*2*math.Pi) }
	drifting := series(func(_ int, s float64) float64 { return 12 + math.Round(2*math.Sin(s/1320*2*math.Pi)) })
	climbing := series(func(_ int, s float64) float64 { return 10 + math.Floor(s/600) })
	unread := func(i int) float64 {
		if i%50 == 7 {
			return math.NaN()
		}
		return 0
	}

	for _, c := range []struct {
		name  string
		judge judge
		ys    []float64
		given []float64
		leaks bool
		// lineOver: a line through the second half calls it over the
		// bound (so the case shows what the judge adds, or that the series
		// is what it claims).
		lineOver bool
	}{
		{"rises, flat with noise", byRises, series(func(_ int, s float64) float64 { return 28 + 0.05*math.Sin(s) }), nil, false, false},
		{"rises, leak", byRises, series(func(_ int, s float64) float64 { return 28 + leak(s) }), nil, true, true},
		{"rises, a step", byRises, series(func(_ int, s float64) float64 { return 28 + step(s) }), nil, false, true},
		{"rises, a step on a leak", byRises, series(func(_ int, s float64) float64 { return 28 + step(s) + leak(s) }), nil, true, true},
		{"rises, a burst", byRises, series(func(_ int, s float64) float64 { return 23 + burst(s) }), nil, false, true},
		{"rises, a burst on a leak", byRises, series(func(_ int, s float64) float64 { return 23 + burst(s) + leak(s) }), nil, true, true},
		{"rises, a leak in steps", byRises, series(func(_ int, s float64) float64 { return 28 + stairs(s) }), nil, true, true},
		{"ceiling, saw-tooth", byCeiling, series(func(_ int, s float64) float64 { return saw(s) }), nil, false, true},
		{"ceiling, saw-tooth on a leak", byCeiling, series(func(_ int, s float64) float64 { return saw(s) + leak(s) }), nil, true, true},
		{"ceiling, a step early in the run", byCeiling, series(func(_ int, s float64) float64 { return 100 + 20*math.Min(1, s/600) + saw(s) }), nil, false, true},
		{"fixed processes, pool swing and burst", atFixedGiven, series(held), procs, false, true},
		{"fixed processes, pool swing and burst on a leak", atFixedGiven, series(func(i int, s float64) float64 { return held(i, s) + leak(s) }), procs, true, true},
		{"fixed processes, what each holds wanders", atFixedGiven, series(func(i int, s float64) float64 { return held(i, s) + wander(s) }), procs, false, true},
		{"fixed processes, what each holds wanders on a leak", atFixedGiven, series(func(i int, s float64) float64 { return held(i, s) + wander(s) + leak(s) }), procs, true, true},
		// The count on a 22-minute cycle, so that it is not where it was
		// half an hour earlier, with a sample in 50 not read.
		{"fixed processes, a cycle apart from the quarters", atFixedGiven, series(func(i int, s float64) float64 { return 136 + 2.8*drifting[i] + unread(i) }), drifting, false, true},
		{"fixed processes, a cycle apart from the quarters on a leak", atFixedGiven, series(func(i int, s float64) float64 { return 136 + 2.8*drifting[i] + unread(i) + leak(s) }), drifting, true, true},
		// The pools grow from 10 to 16 over the hour and never come back:
		// no count in both quarters, nothing to compare, which fails.
		{"fixed processes, no count in common", atFixedGiven, series(func(i int, s float64) float64 { return 136 + 2.8*climbing[i] }), climbing, true, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			if line := slopePerHour(times, c.ys); (math.Abs(line) > bound) != c.lineOver {
				t.Fatalf("made-up series wrong: a line through it is %+.2f/h", line)
			}
			got, how := growth(c.judge, times, c.ys, c.given)
			if !(got <= bound) != c.leaks { // NaN fails, as in the soak
				t.Errorf("growth %+.2f/h (%s) against a bound of %g/h: leak=%v", got, how, bound, c.leaks)
			}
		})
	}
}
