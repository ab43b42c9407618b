package config

import (
	"errors"
	"strings"
	"unicode"
	"unicode/utf8"
)

// maxIdentifierBytes is PostgreSQL's NAMEDATALEN-1: longer names are
// truncated by the server, so the config would name another table.
const maxIdentifierBytes = 63

// NormalizeTable returns the canonical form of a table name from the config:
// "schema.table".
//
// The input is "table" or "schema.table", written as in SQL: an unquoted
// identifier (a letter or '_', then letters, digits, '_' or '$') is folded
// to lower case; a double-quoted identifier keeps its case and may hold any
// character, with "" standing for one double quote. A name without a schema
// gets "public.". In the result each part is written bare when it consists
// of a-z, 0-9, '_' and '$' only (and does not start with a digit or '$'),
// and double-quoted otherwise, so:
//
//	Accounts            → public.accounts
//	sales.Orders        → sales.orders
//	"Sales"."Orders"    → "Sales"."Orders"
//	"odd.name"          → public."odd.name"
//
// NormalizeTable(NormalizeTable(x)) == NormalizeTable(x). Use [SplitTable]
// to get the two identifiers for SQL (e.g. pgx.Identifier); the result is
// not meant to be pasted into SQL as it is (a reserved word such as "order"
// is left bare).
func NormalizeTable(name string) (string, error) {
	schema, table, err := SplitTable(name)
	if err != nil {
		return "", err
	}
	return quoteIdentifier(schema) + "." + quoteIdentifier(table), nil
}

// SplitTable parses a table name as [NormalizeTable] does and returns its
// schema and table identifiers as PostgreSQL stores them (unquoted, case
// resolved).
//
// Its errors describe the problem without repeating the name.
func SplitTable(name string) (schema, table string, err error) {
	parts, err := splitIdentifiers(name)
	if err != nil {
		return "", "", err
	}
	switch len(parts) {
	case 1:
		return "public", parts[0], nil
	case 2:
		return parts[0], parts[1], nil
	default:
		return "", "", errors.New("has more than two dot-separated parts")
	}
}

func splitIdentifiers(s string) ([]string, error) {
	if s == "" {
		return nil, errors.New("is empty")
	}
	if !utf8.ValidString(s) {
		return nil, errors.New("is not valid UTF-8")
	}
	var parts []string
	for i := 0; ; {
		var (
			part string
			err  error
		)
		if i < len(s) && s[i] == '"' {
			part, i, err = quotedIdentifier(s, i)
		} else {
			part, i, err = bareIdentifier(s, i)
		}
		if err != nil {
			return nil, err
		}
		if len(part) > maxIdentifierBytes {
			return nil, errors.New("has an identifier longer than 63 bytes, which PostgreSQL would truncate")
		}
		parts = append(parts, part)
		if i == len(s) {
			return parts, nil
		}
		if s[i] != '.' {
			return nil, errors.New("has an unexpected character; only letters, digits, '_' and '$' are allowed outside double quotes")
		}
		i++
		if i == len(s) {
			return nil, errors.New("ends with a dot")
		}
	}
}

// quotedIdentifier reads "..." starting at s[i] == '"'.
func quotedIdentifier(s string, i int) (string, int, error) {
	var b strings.Builder
	for j := i + 1; j < len(s); j++ {
		if s[j] != '"' {
			if s[j] == 0 {
				return "", 0, errors.New("contains a NUL character")
			}
			b.WriteByte(s[j])
			continue
		}
		if j+1 < len(s) && s[j+1] == '"' {
			b.WriteByte('"')
			j++
			continue
		}
		if b.Len() == 0 {
			return "", 0, errors.New(`has an empty quoted identifier ""`)
		}
		return b.String(), j + 1, nil
	}
	return "", 0, errors.New("has a double quote without its closing quote")
}

// bareIdentifier reads an unquoted identifier starting at s[i] and folds
// ASCII letters to lower case, as PostgreSQL does.
func bareIdentifier(s string, i int) (string, int, error) {
	j := i
	for j < len(s) {
		r, size := utf8.DecodeRuneInString(s[j:])
		ok := r == '_' || r < utf8.RuneSelf && (r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z') || r >= utf8.RuneSelf && unicode.IsLetter(r)
		if j > i {
			ok = ok || r >= '0' && r <= '9' || r == '$'
		}
		if !ok {
			break
		}
		j += size
	}
	if j == i {
		if i == len(s) || s[i] == '.' {
			return "", 0, errors.New("has an empty part")
		}
		return "", 0, errors.New("has an identifier that starts with a character other than a letter or '_'")
	}
	return asciiLower(s[i:j]), j, nil
}

func asciiLower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c >= 'A' && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}

// quoteIdentifier writes id bare when PostgreSQL would read it back
// unchanged without quotes, else in double quotes.
func quoteIdentifier(id string) string {
	bare := id != ""
	for i := 0; i < len(id) && bare; i++ {
		c := id[i]
		bare = c == '_' || c >= 'a' && c <= 'z' || i > 0 && (c >= '0' && c <= '9' || c == '$')
	}
	if bare {
		return id
	}
	return `"` + strings.ReplaceAll(id, `"`, `""`) + `"`
}

// TemplateColumns returns the column names of the {column} placeholders in
// a cache key template, in order. "account:{id}" gives ["id"]. Every '{'
// opens a placeholder, which must be closed by '}' and name a column;
// braces do not nest. A template without placeholders is a fixed key.
func TemplateColumns(template string) ([]string, error) {
	if template == "" {
		return nil, errors.New("is empty")
	}
	var cols []string
	start := -1
	for i := 0; i < len(template); i++ {
		switch template[i] {
		case '{':
			if start >= 0 {
				return nil, errors.New("has a '{' inside a placeholder; placeholders do not nest")
			}
			start = i
		case '}':
			if start < 0 {
				return nil, errors.New("has a '}' without an opening '{'")
			}
			col := template[start+1 : i]
			if strings.TrimSpace(col) == "" {
				return nil, errors.New("has an empty placeholder {}")
			}
			cols = append(cols, col)
			start = -1
		}
	}
	if start >= 0 {
		return nil, errors.New("has a '{' without its closing '}'")
	}
	return cols, nil
}
