module spotify-token-swap

go 1.24.0

require github.com/joho/godotenv v1.5.1
