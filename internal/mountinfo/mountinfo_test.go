package mountinfo

import "testing"

func TestUnescape(t *testing.T) {
	for in, want := range map[string]string{
		`/run/cohort/run/a`:        "/run/cohort/run/a",
		`/tmp/with\040space`:       "/tmp/with space",
		`/tmp/tab\011and\134slash`: "/tmp/tab\tand\\slash",
		`/tmp/short\04`:            `/tmp/short\04`,
	} {
		if got := Unescape(in); got != want {
			t.Errorf("Unescape(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestUnderFindsRoot(t *testing.T) {
	mps, err := Under("/")
	if err != nil {
		t.Fatal(err)
	}
	if len(mps) == 0 || mps[len(mps)-1] != "/" {
		t.Fatalf("mounts under / = %v, want / last (deepest first)", mps)
	}
	for i := 1; i < len(mps); i++ {
		if len(mps[i]) > len(mps[i-1]) {
			t.Fatalf("not deepest first: %q before %q", mps[i-1], mps[i])
		}
	}
}
