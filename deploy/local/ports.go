package local

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
)

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort() (int, error) {
	ports, err := FreePorts(1)
	if err != nil {
		return 0, err
	}
	return ports[0], nil
}

// lowestPort is the lowest port FreePorts picks from.
const lowestPort = 10000

// FreePorts returns n distinct free ports on 127.0.0.1. All n listeners are
// held open until every port is known, so no port is handed out twice.
//
// The ports come from below the kernel's ephemeral range where it can
// tell (Linux's ip_local_port_range): a port picked from inside it could
// be given to an outgoing connection — this process's or any other's —
// between the pick and its server's bind, which failed a CI run
// ("bind: address already in use"). Another process can still bind a
// port before its user does, but none gets it by chance.
func FreePorts(n int) (ports []int, err error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			err = errors.Join(err, l.Close())
		}
		if err != nil {
			ports = nil
		}
	}()
	below := ephemeralLow()
	for tries := 0; len(ports) < n; tries++ {
		port, random := 0, below > lowestPort && tries < 100*n
		if random {
			port = lowestPort + rand.IntN(below-lowestPort)
		}
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port))
		if err != nil {
			if random {
				continue // taken: try another
			}
			return nil, fmt.Errorf("pick a free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// ephemeralLow returns the lowest port of the kernel's ephemeral range, or
// 0 if it cannot tell.
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return 0
	}
	low, err := strconv.Atoi(f[0])
	if err != nil {
		return 0
	}
	return low
}
