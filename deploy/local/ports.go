package local

import (
	"errors"
	"fmt"
	"net"
)

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort() (int, error) {
	ports, err := FreePorts(1)
	if err != nil {
		return 0, err
	}
	return ports[0], nil
}

// freePorts returns n distinct free ports on 127.0.0.1. All n listeners are
// held open until every port is known, so no port is handed out twice.
// Another process can still take one before its user binds it.
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
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("pick a free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}
