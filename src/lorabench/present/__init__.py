"""What the commands print: each module turns rows, estimates or checks into records and
rich tables (report, compare, claims, estimates, fit_table, underflow, bars), and
writer.py turns those into table, markdown, csv or json text in one place."""
